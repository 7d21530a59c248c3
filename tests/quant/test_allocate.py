"""MC-MoE's bit allocation: the ILP's answer equals brute force, meets the budget, and gives
the important experts the bits."""

import itertools

import numpy as np
import pytest

from jmoe.quant import allocate_bits
from jmoe.quant.allocate import costs


def _brute_force(c, cands, avg_bits):
    E = c.shape[0]
    best = None
    for combo in itertools.product(range(len(cands)), repeat=E):
        b = np.asarray(cands)[list(combo)]
        if b.sum() > avg_bits * E + 1e-9 or cands[-1] not in b or cands[-2] not in b:
            continue
        value = sum(c[j, combo[j]] for j in range(E))
        if best is None or value < best[0] - 1e-12:
            best = (value, b)
    return best[1]


@pytest.mark.parametrize("seed,avg_bits", [(0, 2.0), (1, 2.5), (2, 1.75)])
def test_equals_brute_force_per_layer(seed, avg_bits):
    rng = np.random.default_rng(seed)
    f, w = rng.random((2, 4)), rng.random((2, 4))
    loss = np.sort(rng.random((2, 4, 3)) * 100, axis=-1)[..., ::-1].copy()  # fewer bits, more loss
    bits = allocate_bits(f, w, loss, avg_bits)
    c = costs(f, w, loss)
    for layer in range(2):
        np.testing.assert_array_equal(bits[layer], _brute_force(c[layer], (1, 2, 3), avg_bits))
        assert bits[layer].mean() <= avg_bits + 1e-9


def test_important_experts_get_the_bits():
    loss = np.tile(np.array([100.0, 30.0, 10.0]), (1, 8, 1))
    freq = np.array([[8, 1, 1, 1, 1, 1, 1, 8]], float)
    bits = allocate_bits(freq, freq, loss, 2.0)
    assert bits[0, 0] == bits[0, 7] == 3 and bits.mean() <= 2.0


def test_global_budget_lets_layers_differ():
    loss = np.stack([np.tile([1000.0, 300.0, 100.0], (4, 1)), np.tile([1.0, 0.5, 0.4], (4, 1))])
    f = np.ones((2, 4))
    per_layer = allocate_bits(f, f, loss, 2.0)
    shared = allocate_bits(f, f, loss, 2.0, per_layer=False)
    assert per_layer.mean(1).max() <= 2.0
    assert shared.mean() <= 2.0 and shared[0].mean() > per_layer[0].mean() and shared[1].mean() < per_layer[1].mean()


def test_bad_budget_and_widths():
    f = np.ones((1, 8))
    loss = np.ones((1, 8, 3))
    with pytest.raises(ValueError, match="avg_bits=1.1: no allocation"):
        allocate_bits(f, f, loss, 1.1)
    with pytest.raises(ValueError, match="candidates=5"):
        allocate_bits(f, f, loss, 2.0, candidates=(1, 2, 5))
    with pytest.raises(ValueError, match="share"):
        allocate_bits(f, np.ones((1, 7)), loss, 2.0)
