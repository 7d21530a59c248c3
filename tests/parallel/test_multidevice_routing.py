"""The routing zoo through the expert-parallel layer on 8 simulated CPU devices (see
test_multidevice.py)."""

import pytest

from tests.parallel.test_multidevice import ROUTING, run_on_eight_devices


@pytest.mark.slow
@pytest.mark.parametrize("name", ROUTING)
def test_routing_on_eight_simulated_devices(name):
    run_on_eight_devices(name)
