import jax
import pytest
from hypothesis import HealthCheck, settings

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
