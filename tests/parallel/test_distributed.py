"""Two OS processes joined by jax.distributed (CPU, gloo) train like one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.train.conftest import MICRO

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run: Path):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in l]


def train_cmd(out, *extra):
    return [sys.executable, "-m", "jmoe.cli", "train", "--out", str(out), "--steps", "3", "--ckpt-every", "3",
            "--eval-every", "3", "--quiet", *MICRO, "--batch-size", "8", *extra]


def test_two_processes_equal_one(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # --cpu-devices sets each process's device count
    port = free_port()
    multi = tmp_path / "multi"
    procs = [
        subprocess.Popen(
            train_cmd(multi, "--mesh", "data=2,expert=2", "--cpu-devices", "2", "--coordinator", f"127.0.0.1:{port}",
                      "--num-processes", "2", "--process-id", str(i)),
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)

    single = tmp_path / "single"
    out = subprocess.run(train_cmd(single), cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    np.testing.assert_allclose(losses(multi), losses(single), rtol=2e-5)
    assert (multi / "checkpoints" / "3").is_dir()
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["devices"] == 4 and summary["mesh"] == "data=2,expert=2"
