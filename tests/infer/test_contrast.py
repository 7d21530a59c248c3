"""Self-contrast decoding (`jmoe.infer.contrast`): the engine's cached, batched contrast equals
a full forward of the strong and the weak routing token by token; beta 0 is plain decoding;
`jmoe generate` and `jmoe evaluate` take it as flags; bad input is one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.infer import Engine, SamplingParams
from jmoe.infer.contrast import SelfContrast
from jmoe.nn import LMConfig, init_lm
from tests.infer.test_generate_cli import hf_dir, run  # noqa: F401  (fixture)
from tests.test_bad_input import snapshot, unchanged
from tests.util import jit_lm_apply

MOE = MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8, router_options={"renormalize": True})
CFG = LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, d_ff=16, max_seq_len=32, moe=MOE)
PROMPTS = [[3, 5, 7, 9], [1, 2], [11, 12, 13, 14, 15, 16]]


def _reference(cfg, params, contrast, prompt, steps):
    """Greedy self-contrast decoding by full forwards of the whole sequence (no cache)."""
    weak_cfg = contrast.weak_config(cfg)
    seq = list(prompt)
    for _ in range(steps):  # one shape: the model is causal, the padding after the sequence changes nothing
        x = jnp.asarray([seq + [0] * (cfg.max_seq_len - len(seq))], jnp.int32)
        strong = jit_lm_apply(params, x, cfg)[0][0, len(seq) - 1]
        weak = jit_lm_apply(params, x, weak_cfg)[0][0, len(seq) - 1]
        seq.append(int(jnp.argmax(contrast.combine(strong, weak))))
    return seq[len(prompt):]


@pytest.mark.parametrize("contrast", [SelfContrast(), SelfContrast(ranks=(3, 1), alpha=0.05, beta=1.0)])
def test_cached_contrast_equals_full_forwards(contrast):
    params = init_lm(jax.random.key(0), CFG)
    gens, _ = Engine(CFG, params, contrast=contrast).generate(PROMPTS, max_new_tokens=6)
    for p, g in zip(PROMPTS, gens):
        assert list(g.token_ids) == _reference(CFG, params, contrast, p, 6)


def test_beta_0_is_plain_decoding_and_the_contrast_changes_tokens():
    params = init_lm(jax.random.key(1), CFG)
    sampling = SamplingParams(temperature=0.9, top_p=0.95)
    plain = Engine(CFG, params).generate(PROMPTS, max_new_tokens=8, sampling=sampling, seed=3)[0]
    zero = Engine(CFG, params, contrast=SelfContrast(beta=0.0, alpha=1e-9)).generate(
        PROMPTS, max_new_tokens=8, sampling=sampling, seed=3)[0]
    strong = Engine(CFG, params, contrast=SelfContrast(ranks=(1,), beta=5.0)).generate(
        PROMPTS, max_new_tokens=8, sampling=sampling, seed=3)[0]
    assert [g.token_ids for g in zero] == [g.token_ids for g in plain]
    assert [g.token_ids for g in strong] != [g.token_ids for g in plain]


def test_combine_is_the_reference_formula():
    strong = jnp.asarray([[2.0, 1.0, -3.0, 1.9]])
    weak = jnp.asarray([[1.0, 2.0, 0.0, -1.0]])
    got = np.asarray(SelfContrast(alpha=0.1, beta=0.5).combine(strong, weak))
    # token 2 is below log(0.1) + 2 = -0.30: excluded
    np.testing.assert_allclose(got, [[2.5, 0.5, -np.inf, 3.35]])


@pytest.mark.parametrize("make, message", [
    (lambda: Engine(CFG.replace(moe=None), init_lm(jax.random.key(0), CFG.replace(moe=None)), contrast=SelfContrast()),
     "no MoE layers"),
    (lambda: SelfContrast(ranks=(4,)).weak_config(CFG), "rank 4 needs 5 experts; MoE layer 0 has 4"),
    (lambda: SelfContrast(ranks=()), "contrast.ranks"),
    (lambda: SelfContrast(alpha=0.0), "contrast.alpha"),
    (lambda: SelfContrast(beta=-1.0), "contrast.beta"),
    (lambda: Engine(CFG, init_lm(jax.random.key(0), CFG), contrast={"beta": 1}), "contrast must be a SelfContrast"),
])
def test_bad_contrast_names_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_generate_and_evaluate_flags(hf_dir, tmp_path, capsys):  # noqa: F811
    from jmoe.infer import load

    code, out, err = run(["generate", "--ckpt", str(hf_dir), "--prompt", "hello", "--max-new-tokens", "6",
                          "--temperature", "0", "--ignore-eos", "--json", "--self-contrast", "1",
                          "--contrast-beta", "1.5"], capsys)
    assert code == 0, err
    model = load(hf_dir)
    want, _ = model.engine(contrast=SelfContrast(ranks=(1,), beta=1.5)).generate([model.encode("hello")],
                                                                                   max_new_tokens=6)
    assert json.loads(out.splitlines()[0])["token_ids"] == list(want[0].token_ids)
    code, out, err = run(["evaluate", "--ckpt", str(hf_dir), "--tasks", "addition", "--examples", "4", "--json",
                          "--self-contrast", "0"], capsys)
    assert code == 0, err
    assert json.loads(out)["self_contrast"] == {"ranks": [0], "alpha": 0.1, "beta": 0.5}


@pytest.mark.parametrize("flags, message", [
    (["--contrast-beta", "1"], "--contrast-beta needs --self-contrast"),
    (["--self-contrast", "a"], "--self-contrast 'a' must be comma-separated ranks"),
    (["--self-contrast", "0,0"], "names a rank twice"),
    (["--self-contrast", "4"], "rank 4 needs 5 experts"),
    (["--self-contrast", "1", "--contrast-alpha", "0"], "argument --contrast-alpha"),
    (["--self-contrast", "1", "--offload-experts"], "cannot be combined with --offload-experts"),
])
def test_bad_contrast_flags_are_one_line_before_any_weights(flags, message, hf_dir, tmp_path, capsys,  # noqa: F811
                                                            monkeypatch):
    from jmoe.io import hf

    monkeypatch.setattr(hf, "load", lambda *a, **k: pytest.fail("weights were read"))
    before = snapshot(tmp_path, hf_dir)
    code, out, err = run(["generate", "--ckpt", str(hf_dir), "--quiet", *flags], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert out == "" and unchanged(before, snapshot(tmp_path, hf_dir))
