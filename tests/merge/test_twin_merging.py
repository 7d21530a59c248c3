"""Twin-Merging: the exclusive parts are the SVD of each fine-tune minus the shared merge, a
router sure of one task gives that fine-tune's FFN back at full rank, router training learns to
tell the tasks apart and changes nothing else, decoding with a KV cache equals the full
forward, and bad input is refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import merge
from jmoe.experts import ffn
from jmoe.merge.twin_merging import low_rank, read_positions
from jmoe.nn import LMConfig
from jmoe.registry import ADAPTERS
from tests.infer.test_engine import assert_cached_decode_is_the_full_forward
from tests.merge.test_we_moe import _zoo as fine_tunes
from tests.util import jit_lm_apply, tree_allclose

CFG = LMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=32)


def _zoo(n=3):
    """A base of CFG and n fine-tunes of it (`test_we_moe`'s)."""
    return fine_tunes(CFG, n)


def _batches(n=3):
    """Task t's inputs use tokens 10t+1..10t+9, so a router can tell the tasks apart; the mask
    marks position 5 (the rest of the row is padding the model has not read)."""
    mask = np.zeros((4, 8), bool)
    mask[:, 5] = True
    return [[(np.asarray(jax.random.randint(jax.random.key(10 * t + j), (4, 8), 10 * t + 1, 10 * t + 10)), mask)
             for j in range(2)] for t in range(n)]


def test_low_rank_is_the_truncated_svd_and_read_positions_end_at_the_last_mask():
    d = np.asarray(jax.random.normal(jax.random.key(0), (2, 6, 5)))
    f = low_rank(jnp.asarray(d), 2)
    u, s, vt = np.linalg.svd(d[1], full_matrices=False)
    np.testing.assert_allclose(f["A"][1] @ f["B"][1], (u[:, :2] * s[:2]) @ vt[:2], rtol=1e-4, atol=1e-5)
    full = low_rank(jnp.asarray(d), 5)
    np.testing.assert_allclose(jnp.einsum("tir,tro->tio", full["A"], full["B"]), d, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(read_positions(np.asarray([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0]], bool)),
                                  [[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])


def test_a_router_sure_of_one_task_gives_its_fine_tune_ffn_at_full_rank():
    base, fts = _zoo()
    cfg, params = merge.twin_merging(CFG, base, fts, _batches(), rank=16, steps=0)
    assert cfg.adapter.kind == "twin" and cfg.adapter.rank == 16
    shared = merge.task_arithmetic(base, fts, lam=0.3)
    tree_allclose({k: v for k, v in params.items() if k != "adapters"}, shared, rtol=0, atol=0)
    ad = params["adapters"]["1"]["ffn"]
    ad = {**ad, "router": {**ad["router"], "b2": jnp.asarray([0.0, 60.0, 0.0])}}
    x = jax.random.normal(jax.random.key(3), (5, 16))
    got, aux = ADAPTERS.get("twin").apply(params["layers"]["1"]["ffn"], ad, x, CFG.activation, cfg.adapter)
    want = ffn(fts[1]["layers"]["1"]["ffn"], x, CFG.activation)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert aux.router_logits.shape == (5, 3)


def test_router_training_tells_the_tasks_apart_and_changes_only_the_routers():
    base, fts = _zoo()
    losses = []
    cfg, trained = merge.twin_merging(CFG, base, fts, _batches(), rank=4, steps=40, lr=1e-2,
                                      log=lambda s, l: losses.append(l))
    _, start = merge.twin_merging(CFG, base, fts, _batches(), rank=4, steps=0)
    assert losses[-1] < 0.5 * losses[0]
    strip = lambda p: {**p, "adapters": {n: {**a, "ffn": {k: v for k, v in a["ffn"].items() if k != "router"}}
                                         for n, a in p["adapters"].items()}}
    tree_allclose(strip(trained), strip(start), rtol=0, atol=0)
    tokens, mask = _batches()[2][0]
    _, aux = jit_lm_apply(trained, jnp.asarray(tokens), cfg)
    probs = jax.nn.softmax(aux.adapters["1"].router_logits.reshape(4, 8, 3)[:, :6], -1)
    assert float(jnp.mean(probs[..., 2])) > 0.6
    # decoding with a KV cache routes every token as the full forward does
    assert_cached_decode_is_the_full_forward(cfg, trained, [[21, 25, 27, 22], [3, 4]], 4)


def test_bad_input_is_refused_by_name():
    base, fts = _zoo()
    with pytest.raises(merge.MergeError, match="rank=0"):
        merge.twin_merging(CFG, base, fts, _batches(), rank=0)
    with pytest.raises(merge.MergeError, match="rank=40 exceeds"):
        merge.twin_merging(CFG, base, fts, _batches(), rank=40)
    with pytest.raises(merge.MergeError, match="one non-empty sequence of unlabeled batches per model"):
        merge.twin_merging(CFG, base, fts, _batches(2))
    with pytest.raises(merge.MergeError, match="steps=-1"):
        merge.twin_merging(CFG, base, fts, _batches(), steps=-1)
