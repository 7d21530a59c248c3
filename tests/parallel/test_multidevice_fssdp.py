"""FSSDP on 8 simulated CPU devices (see test_multidevice.py)."""

import pytest

from tests.parallel.test_multidevice import FSSDP, run_on_eight_devices


@pytest.mark.slow
@pytest.mark.parametrize("name", FSSDP)
def test_fssdp_on_eight_simulated_devices(name):
    run_on_eight_devices(name)
