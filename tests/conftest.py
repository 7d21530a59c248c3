import os

# The tests run tiny shapes, so compiling is most of their time: XLA:CPU compiles without its
# expensive LLVM passes (compile-bound tests run 20-40% faster; the programs compute the same). Set
# before JAX starts its backend; subprocesses of the tests inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
).strip()

import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "jmoe",
    deadline=None,
    max_examples=12,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("jmoe")

import jmoe  # noqa: E402

# XLA:CPU compiles threefry slowly (about a second per random shape); the tests only need
# some reproducible randomness, so they use the "rbg" generator.
jax.config.update("jax_default_prng_impl", "rbg")


_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = []


def pytest_configure(config):
    """One compilation cache for the whole test run: the test workers (started after this)
    and the processes tests start read it from the environment, so a program compiled by one
    test is read back by the next that builds the same one. It is removed when the run ends."""
    if not os.environ.get(_CACHE_ENV):
        _OWN_CACHE.append(tempfile.mkdtemp(prefix="jmoe-test-xla-"))
        os.environ[_CACHE_ENV] = _OWN_CACHE[0]
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    for d in _OWN_CACHE:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def small_cfg():
    return jmoe.MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=16, dispatch_options=dict(block_size=16))


MAX_MAPPINGS = 30000


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: nothing to watch
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after a test module once the process holds more than
    MAX_MAPPINGS memory mappings. XLA:CPU maps memory for each executable it keeps, and the
    whole suite in one process would otherwise pass the kernel's limit on memory mappings
    (vm.max_map_count, 65530 by default), where compiling crashes; below the threshold the
    next modules reuse what is compiled."""
    yield
    if _mappings() > MAX_MAPPINGS:
        jax.clear_caches()
