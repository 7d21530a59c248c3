"""Finding the experts to steer (`jmoe.editing.steer`, RICE's nPMI) against counts taken from
the model's routing directly; `jmoe steer`, and `jmoe generate --steer-experts`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.editing import expert_npmi, top_experts
from jmoe.nn import LMConfig, init_lm, lm_apply
from tests.infer.test_generate_cli import hf_dir, run  # noqa: F401  (fixture)
from tests.test_bad_input import snapshot, unchanged

MOE = MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8)
CFG = LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, d_ff=16, max_seq_len=32, moe=MOE)


def _counts(params, prompts):
    out = np.zeros((2, 4))
    for p in prompts:  # one prompt at a time: no padding at all
        _, aux = lm_apply(params, jnp.asarray([p], jnp.int32), CFG)
        for li, a in enumerate(aux.moe):
            ids = np.asarray(a.routing.expert_ids)[np.asarray(a.routing.mask)]
            out[li] += np.bincount(ids, minlength=4)
    return out


def test_npmi_equals_the_formula_on_direct_counts():
    params = init_lm(jax.random.key(0), CFG)
    rng = np.random.default_rng(0)
    pos = [rng.integers(0, 40, n).tolist() for n in (5, 9, 3)]
    neg = [rng.integers(0, 40, n).tolist() for n in (7, 2, 11, 4)]
    k, K = _counts(params, pos), _counts(params, pos) + _counts(params, neg)
    M, T = 17, 41
    with np.errstate(divide="ignore"):
        want = np.where(k > 0, (np.log2(k / M) + np.log2(T / K)) / np.log2(T / np.maximum(k, 1)), -1.0)
    np.testing.assert_allclose(expert_npmi(CFG, params, pos, neg, batch_size=2), want, rtol=1e-6)


def test_an_expert_chosen_for_exactly_the_positive_tokens_scores_1():
    params = init_lm(jax.random.key(1), CFG)
    # the router's choice is decided by the token: positive tokens are those some expert always takes
    tokens = np.arange(40)[:, None]
    _, aux = jax.jit(lambda p, t: lm_apply(p, t, CFG))(params, jnp.asarray(tokens, jnp.int32))
    first = np.asarray(aux.moe[0].routing.expert_ids)
    chosen = (first == 2).any(-1)
    pos, neg = [[int(t)] for t in np.nonzero(chosen)[0]], [[int(t)] for t in np.nonzero(~chosen)[0]]
    npmi = expert_npmi(CFG, params, pos, neg)
    assert npmi[0, 2] == pytest.approx(1.0) and top_experts(CFG, npmi, 1)[0][:2] == (0, 2)


@pytest.mark.parametrize("make, message", [
    (lambda p: expert_npmi(CFG.replace(moe=None), p, [[1]], [[2]]), "needs an MoE model"),
    (lambda p: expert_npmi(CFG, p, [], [[2]]), "positive must be a non-empty list"),
    (lambda p: expert_npmi(CFG, p, [[1]], [[50]]), r"negative\[0\]: token ids must be in \[0, 40\)"),
    (lambda p: top_experts(CFG, np.zeros((2, 4)), 9), r"top=9 must be in \[1, 8\]"),
])
def test_bad_input_names_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make(init_lm(jax.random.key(0), CFG))


def test_steer_command_and_generate_flag(hf_dir, tmp_path, capsys):  # noqa: F811
    from jmoe.infer import load
    from jmoe.routing.steer import steer_config

    (tmp_path / "pos.txt").write_text("def f(x): return x\ndef g(y): return y\n")
    (tmp_path / "neg.txt").write_text("hello world\nthe mixture of experts\n")
    code, out, err = run(["steer", "--ckpt", str(hf_dir), "--positive", str(tmp_path / "pos.txt"), "--negative",
                          str(tmp_path / "neg.txt"), "--json"], capsys)
    assert code == 0, err
    found = json.loads(out)
    assert len(found["experts"]) == 2 and np.asarray(found["npmi"]).shape == (2, 4)
    flag = found["steer_experts"]
    code, out, err = run(["generate", "--ckpt", str(hf_dir), "--prompt", "hello", "--max-new-tokens", "5",
                          "--temperature", "0", "--ignore-eos", "--json", "--steer-experts", flag,
                          "--steer-factor", "8"], capsys)
    assert code == 0, err
    model = load(hf_dir)
    pairs = [(e["layer"], e["expert"]) for e in found["experts"]]
    model.cfg = steer_config(model.cfg, pairs, 8.0)
    gens, _ = model.engine().generate([model.encode("hello")], max_new_tokens=5)
    assert json.loads(out.splitlines()[0])["token_ids"] == list(gens[0].token_ids)


@pytest.mark.parametrize("flags, message", [
    (["generate", "--steer-factor", "2"], "--steer-factor needs --steer-experts"),
    (["generate", "--steer-experts", "1-2"], "--steer-experts '1-2' must be layer:expert pairs"),
    (["generate", "--steer-experts", "0:9"], "expert 9 is outside"),
    (["generate", "--steer-experts", "5:0"], "layer 5 is not an MoE layer"),
    (["steer", "--positive", "missing.txt", "--negative", "missing.txt"], "--positive missing.txt does not exist"),
    (["steer", "--positive", "POS", "--negative", "POS", "--top", "99"], "--top 99 exceeds the model's 8 routed"),
    (["steer", "--positive", "LONG", "--negative", "POS"], "--positive: prompt 2 has"),
])
def test_bad_steering_flags_are_one_line_before_any_weights(flags, message, hf_dir, tmp_path, capsys,  # noqa: F811
                                                            monkeypatch):
    from jmoe.io import hf

    (tmp_path / "pos.txt").write_text("def f(x)\n")
    (tmp_path / "long.txt").write_text("def f(x)\n" + "x = 1; " * 60 + "\n")
    flags = [str(tmp_path / "pos.txt") if f == "POS" else str(tmp_path / "long.txt") if f == "LONG" else f
             for f in flags]
    monkeypatch.setattr(hf, "load", lambda *a, **k: pytest.fail("weights were read"))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, hf_dir)
    code, out, err = run([flags[0], "--ckpt", str(hf_dir), *flags[1:]], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert unchanged(before, snapshot(tmp_path, hf_dir))
