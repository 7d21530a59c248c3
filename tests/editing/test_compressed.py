"""Compressed experts for a trained model (`jmoe.editing.compressed`): the conversion, KV-cached
decoding of the converted model against full forwards, and `jmoe compressed-experts` followed
by `jmoe train --resume-from`."""

import json

import jax
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.cli import main
from jmoe.editing import active_expert_fraction, compress_experts
from jmoe.infer import Engine
from jmoe.nn import LMConfig, init_lm
from tests.infer.test_generate_cli import run
from tests.test_bad_input import snapshot, unchanged
from tests.util import greedy_by_full_forwards

MOE = MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8)
CFG = LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, d_ff=16, max_seq_len=32, moe=MOE)
PROMPTS = [[3, 5, 7, 9], [1, 2], [11, 12, 13, 14, 15, 16]]


def test_conversion_adds_ones_and_cached_decoding_equals_full_forwards():
    params = init_lm(jax.random.key(0), CFG)
    cfg, new = compress_experts(CFG, params, 1)
    assert cfg.moe.dispatch == "compressed" and active_expert_fraction(cfg) == 0.5
    ex = new["layers"]["1"]["moe"]["experts"]
    assert ex["ce_hidden"].shape == (4, 8) and bool((ex["ce_up"] == 1).all())
    flat_new = dict(jax.tree_util.tree_leaves_with_path(new))
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):  # every original weight unchanged
        assert bool((flat_new[path] == leaf).all()), jax.tree_util.keystr(path)
    # trained vectors: decoding through the engine (prefill, then one token at a time) keeps them
    new = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.3 * jax.random.normal(jax.random.key(len(str(p))), a.shape)
        if "ce_" in jax.tree_util.keystr(p) else a, new)
    gens, _ = Engine(cfg, new).generate(PROMPTS, max_new_tokens=6)
    plain, _ = Engine(CFG, params).generate(PROMPTS, max_new_tokens=6)
    for p, g in zip(PROMPTS, gens):
        assert list(g.token_ids) == greedy_by_full_forwards(new, cfg, p, 6)
    assert [g.token_ids for g in gens] != [g.token_ids for g in plain]


def test_bad_arguments_name_what_is_wrong():
    params = init_lm(jax.random.key(0), CFG)
    with pytest.raises(ValueError, match="num_compressed=2 must be below MoE layer 0's top_k=2"):
        compress_experts(CFG, params, 2)
    with pytest.raises(ValueError, match="num_compressed=0"):
        compress_experts(CFG, params, 0)
    cfg, new = compress_experts(CFG, params, 1)
    with pytest.raises(ValueError, match="already has compressed experts"):
        compress_experts(cfg, new, 1)
    with pytest.raises(ValueError, match="no MoE layers"):
        compress_experts(CFG.replace(moe=None), params, 1)


@pytest.fixture(scope="module")
def top2_run(tmp_path_factory):
    from tests.train.conftest import MICRO

    run = tmp_path_factory.mktemp("runs") / "src"
    assert main(["train", "--out", str(run), "--steps", "4", "--eval-every", "4", "--ckpt-every", "4", "--quiet",
                 *MICRO, "--set", "moe.top_k=2"]) == 0
    return run


def test_cli_writes_a_run_that_fine_tunes(top2_run, tmp_path, capsys):
    out = tmp_path / "ce"
    assert main(["compressed-experts", "--ckpt", str(top2_run), "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["moe"]["dispatch"] == "compressed" and config["compressed_from"]["num_compressed"] == 1
    assert json.loads((out / "report.json").read_text())["active_expert_fraction"] == 0.5
    ft = tmp_path / "ft"
    assert main(["train", "--resume-from", str(out), "--out", str(ft), "--steps", "3", "--eval-every", "3",
                 "--ckpt-every", "3", "--quiet"]) == 0
    from jmoe.train import rundir

    _, _, before, *_ = rundir.load_run(out)
    _, _, after, *_ = rundir.load_run(ft)
    moved = np.abs(np.asarray(after["layers"]["0"]["moe"]["experts"]["ce_up"]) - 1).max()
    assert moved > 0 and np.asarray(before["layers"]["0"]["moe"]["experts"]["ce_up"]).min() == 1
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(ft), "--json", "--batches", "2"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["val_loss"])


@pytest.mark.parametrize("args, message", [
    (["--compressed", "2"], "must be below MoE layer"),
    (["--compressed", "0"], "--compressed"),
])
def test_bad_input_is_one_line_and_changes_nothing(top2_run, tmp_path, capsys, args, message):
    before = snapshot(tmp_path, top2_run)
    code, _, err = run(["compressed-experts", "--ckpt", str(top2_run), "--out", str(tmp_path / "ce"), *args], capsys)
    err = err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert unchanged(before, snapshot(tmp_path, top2_run))
