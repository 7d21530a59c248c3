"""Training Mowst (`jmoe.train.mowst`) and `jmoe mowst`: each turn trains its own side only,
the gate learns to trust the weak expert where it predicts better, the written run decodes
with `jmoe generate --mowst` and reads as a plain run elsewhere; bad input is one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.cli import main
from jmoe.nn import LMConfig, init_lm, token_nll
from jmoe.nn.mowst import MowstConfig, init_mowst, weak_outputs
from jmoe.train.mowst import evaluate_mowst, train_mowst
from tests.infer.test_generate_cli import run
from tests.train.conftest import refused_in_one_line

MOE = MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8)
CFG = LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, d_ff=16, max_seq_len=32, moe=MOE)
MCFG = MowstConfig(window=1, embed_dim=16, hidden=32, gate_hidden=8)


def _half_bigram(i: int) -> np.ndarray:
    """[8, 17] sequences: after a token below 20 comes (t * 7 + 3) % 40, after the others a
    uniformly random token."""
    rng = np.random.default_rng(i)
    seqs = np.zeros((8, 17), np.int32)
    seqs[:, 0] = rng.integers(0, 40, 8)
    for t in range(1, 17):
        prev = seqs[:, t - 1]
        seqs[:, t] = np.where(prev < 20, (prev * 7 + 3) % 40, rng.integers(0, 40, 8))
    return seqs


def test_each_turn_trains_its_own_side_only():
    params = init_lm(jax.random.key(0), CFG)
    mowst = init_mowst(jax.random.key(1), 40, MCFG)
    p1, _, m1, hist = train_mowst(CFG, params, None, mowst, MCFG, _half_bigram, rounds=1, weak_steps=2, strong_steps=0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p1)))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mowst), jax.tree.leaves(m1)))
    p2, _, m2, _ = train_mowst(CFG, params, None, mowst, MCFG, _half_bigram, rounds=1, weak_steps=0, strong_steps=2)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mowst), jax.tree.leaves(m2)))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p2)))
    assert [h["turn"] for h in hist] == ["weak"]
    with pytest.raises(ValueError, match="rounds"):
        train_mowst(CFG, params, None, mowst, MCFG, _half_bigram, rounds=-1)


def test_the_gate_trusts_the_weak_expert_where_it_predicts_better():
    params = init_lm(jax.random.key(0), CFG)  # an untrained strong model: above log 40 everywhere
    mowst = init_mowst(jax.random.key(1), 40, MCFG)
    _, _, mowst, hist = train_mowst(CFG, params, None, mowst, MCFG, _half_bigram, rounds=1, weak_steps=150,
                                    strong_steps=0, lr=1e-2)
    seqs = jnp.asarray(_half_bigram(10_000))
    wl, conf = weak_outputs(mowst, seqs[:, :-1], MCFG)
    nll = token_nll(wl, seqs[:, 1:])
    sure = seqs[:, :-1] < 20
    assert float(jnp.mean(nll[sure])) < 0.5 < float(jnp.mean(nll[~sure]))
    assert float(jnp.mean(conf[sure])) > float(jnp.mean(conf[~sure])) + 0.05
    threshold = float(jnp.mean(conf[sure]) + jnp.mean(conf[~sure])) / 2
    scores = evaluate_mowst(CFG, params, None, mowst, MCFG, np.stack([_half_bigram(7)]), threshold=threshold)
    assert scores["expected_loss"] < scores["strong_loss"] and 0.3 < scores["threshold_skip"] < 0.8
    assert scores["threshold_loss"] < scores["strong_loss"]
    assert hist[0]["loss"] < 3.7


@pytest.fixture(scope="module")
def mowst_dir(micro_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("mowst") / "m"
    assert main(["mowst", "--ckpt", str(micro_run), "--out", str(out), "--rounds", "1", "--weak-steps", "3",
                 "--strong-steps", "2", "--window", "2", "--hidden", "16", "--threshold", "0.4", "--quiet"]) == 0
    return out


def test_cli_writes_a_run_that_generates_with_skips(mowst_dir, capsys):
    config = json.loads((mowst_dir / "config.json").read_text())
    assert config["mowst"] == {"config": {"window": 2, "embed_dim": 64, "hidden": 16, "layers": 2, "gate_hidden": 64},
                               "threshold": 0.4}
    report = json.loads((mowst_dir / "report.json").read_text())
    assert [h["turn"] for h in report["history"]] == ["weak", "strong"]
    assert set(report["scores"]) >= {"expected_loss", "threshold_skip", "strong_loss", "weak_loss"}
    code, out, _ = run(["generate", "--ckpt", str(mowst_dir), "--mowst", "--mowst-threshold", "0", "--prompt", "ab",
                        "--max-new-tokens", "5", "--json", "--temperature", "0", "--ignore-eos"], capsys)
    lines = [json.loads(x) for x in out.strip().splitlines()]
    assert code == 0 and len(lines[0]["token_ids"]) == 5
    assert lines[-1]["mowst"]["threshold"] == 0.0 and lines[-1]["mowst"]["skip_share"] == 1.0
    code, _, err = run(["generate", "--ckpt", str(mowst_dir), "--mowst", "--prompt", "ab", "--max-new-tokens", "3"],
                       capsys)
    assert code == 0 and "came from the weak expert (threshold 0.4)" in err
    code, out, _ = run(["eval", "--ckpt", str(mowst_dir), "--json", "--batches", "1"], capsys)  # a plain run elsewhere
    assert code == 0 and np.isfinite(json.loads(out)["val_loss"])


@pytest.mark.parametrize("args, message", [
    (["mowst", "--out", "{tmp}/m", "--threshold", "2"], "--threshold"),
    (["mowst", "--out", "{tmp}/m", "--rounds", "0"], "--rounds"),
    (["mowst", "--out", "{tmp}/m", "--window", "0"], "--window"),
    (["mowst", "--out", "{src}"], "not empty"),
    (["generate", "--mowst"], "is not a Mowst run"),
    (["generate", "--mowst-threshold", "0.3"], "--mowst-threshold needs --mowst"),
])
def test_bad_input_is_one_line_and_changes_nothing(micro_run, tmp_path, capsys, args, message):
    refused_in_one_line(args, message, micro_run, tmp_path, capsys)


def test_mowst_runs_refuse_a_second_mowst_and_other_decoders(mowst_dir, tmp_path, capsys):
    code, _, err = run(["mowst", "--ckpt", str(mowst_dir), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "is a Mowst run already" in err and not (tmp_path / "x").exists()
    code, _, err = run(["generate", "--ckpt", str(mowst_dir), "--mowst", "--self-contrast", "1"], capsys)
    assert code == 2 and "--mowst cannot be combined with --self-contrast" in err.strip()
