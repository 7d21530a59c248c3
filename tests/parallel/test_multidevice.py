"""Runs tests/parallel/multidevice/md_*.py in a subprocess that simulates 8 CPU devices.

XLA reads the device count when JAX starts its backend, so these tests cannot share the
main test process. The longer scripts run from test_multidevice_routing.py and
test_multidevice_training.py, so that they can run on different test workers.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROUTING, TRAINING, PLACEMENT, FSSDP = ["md_ep_routing.py"], ["md_ep_training.py"], ["md_placement.py"], ["md_fssdp.py"]
FILES = sorted(p.name for p in (Path(__file__).parent / "multidevice").glob("md_*.py") if p.name not in ROUTING + TRAINING + PLACEMENT + FSSDP)


def run_on_eight_devices(name: str) -> None:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "python_files=md_*.py",
         f"tests/parallel/multidevice/{name}"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_on_eight_simulated_devices(name):
    run_on_eight_devices(name)
