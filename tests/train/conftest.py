import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

# A model small enough that a process compiles and trains it in seconds.
MICRO = [
    "--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
    "--set", "model.d_ff=64", "--set", "moe.num_experts=4", "--set", "moe.d_ff=32",
    "--set", "moe.dropless.block_size=32", "--batch-size", "4", "--seq-len", "32",
    "--set", "train.eval_batches=2", "--set", "train.warmup_steps=2",
]

ROOT = Path(__file__).resolve().parents[2]

_LOCK_HOLDER = """
import sys
from jmoe.train import rundir
lock = rundir.lock(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def lock_held(run: Path):
    """Another process holding the writer's lock of the run directory `run`; yields its pid."""
    p = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(run)], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert p.stdout.readline().strip() == "locked"
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.fixture
def micro_args():
    return list(MICRO)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """A run of the MICRO MoE trained 4 steps (one per test module)."""
    from jmoe.cli import main

    out = tmp_path_factory.mktemp("runs") / "src"
    assert main(["train", "--out", str(out), "--steps", "4", "--eval-every", "4", "--ckpt-every", "4", "--quiet",
                 *MICRO]) == 0
    return out


def refused_in_one_line(args: list[str], message: str, src: Path, tmp_path: Path, capsys) -> None:
    """`jmoe args[0] --ckpt src args[1:]` ("{tmp}" and "{src}" filled in) exits 2 with one line
    on stderr holding `message`, and changes nothing under tmp_path or src."""
    from tests.infer.test_generate_cli import run
    from tests.test_bad_input import snapshot, unchanged

    argv = [a.format(tmp=tmp_path, src=src) for a in args]
    before = snapshot(tmp_path, src)
    code, _, err = run([argv[0], "--ckpt", str(src), *argv[1:]], capsys)
    err = err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert unchanged(before, snapshot(tmp_path, src))
