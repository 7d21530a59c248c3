"""The pieces of the merging benchmark (`jmoe.merge.bench`)."""

import jax
import jax.numpy as jnp
import numpy as np

from jmoe import evals, merge
from jmoe.infer.tokenizer import ByteTokenizer
from jmoe.merge import bench
from jmoe.nn import LMConfig, init_lm, lm_apply


def test_unlabeled_batches_mask_the_prediction_of_the_answer():
    tok = ByteTokenizer()
    task = evals.resolve_tasks("addition")[0]
    batches = bench.unlabeled_batches(task, tok, n=20, batch_size=8, seq_len=32, seed=1)
    prompts = task.examples("train", 20, 1)
    longest = max(len(tok.encode(ex.prompt, add_special_tokens=False)) for ex in prompts)
    assert longest < 32  # the padding after the longest prompt is cut
    assert [b[0].shape for b in batches] == [(8, longest), (8, longest), (4, longest)]
    tokens, mask = batches[0]
    for row, m, ex in zip(tokens, mask, prompts):
        ids = tok.encode(ex.prompt, add_special_tokens=False)
        assert list(row[:len(ids)]) == ids and m.sum() == 1 and m[len(ids) - 1]  # no answer in the input
    text = evals.resolve_tasks("prose")[0]
    tokens, mask = bench.unlabeled_batches(text, tok, n=4, batch_size=4, seq_len=16)[0]
    assert tokens.shape == (4, 15) and mask.all()  # the last token predicts nothing inside the window


def test_entropy_objective_is_the_lm_prediction_entropy():
    cfg = LMConfig(vocab_size=256, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=32)
    params = init_lm(jax.random.key(0), cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)), jnp.int32)
    mask = jnp.zeros((2, 8), bool).at[:, 3].set(True)
    logits, _ = lm_apply(params, tokens, cfg)
    want = merge.prediction_entropy(logits[:, 3], None)
    np.testing.assert_allclose(bench.entropy_objective(cfg)(params, (tokens, mask)), want, rtol=1e-5)
    # cutting the columns after the last masked position changes nothing (the model is causal)
    np.testing.assert_allclose(bench.entropy_objective(cfg)(params, (tokens[:, :4], mask[:, :4])), want, rtol=1e-5)


def test_merge_models_and_normalized_scores():
    base = {"w": jnp.zeros(3)}
    models = [{"w": jnp.ones(3)}, {"w": 3 * jnp.ones(3)}]
    np.testing.assert_allclose(bench.merge_models("linear", base, models)["w"], 2.0)
    np.testing.assert_allclose(bench.merge_models("task_arithmetic", base, models, lam=0.5)["w"], 2.0)
    got = bench.normalized_scores({"addition": 0.4, "prose": 2.5}, {"addition": 0.8, "prose": 2.0},
                                  {"addition": "exact_match", "prose": "bits_per_byte"})
    assert got == {"addition": 0.5, "prose": 0.8}
