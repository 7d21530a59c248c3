"""PreMoe: task scores against a direct computation, subsets and retrieval, the pruned model
against the full one with the other experts masked out, and the commands that store and use it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe.cli import main
from jmoe.merge.experts.premoe import TaskExperts, prune_to, task_scores
from jmoe.nn import LMConfig, init_lm, lm_apply

CFG = LMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32,
               moe=jmoe.MoEConfig(num_experts=6, top_k=2, d_model=32, d_ff=32))


def test_task_scores_equal_the_mean_mark_of_each_token():
    params = init_lm(jax.random.key(0), CFG)
    seqs = [list(np.random.default_rng(i).integers(0, 256, n)) for i, n in enumerate((5, 17, 5))]
    routing = jax.jit(lambda p, t: [a.routing.logits for a in lm_apply(p, t, CFG)[1].moe])
    for k, threshold, score in ((1, 0.0, "prob"), (2, 0.45, "logit")):
        got = task_scores(params, CFG, seqs, k=k, threshold=threshold, score=score, batch_size=2)
        want = [np.zeros(6) for _ in CFG.moe_layers]
        for s in seqs:
            for j, layer_logits in enumerate(routing(params, jnp.asarray([s]))):
                logits = np.asarray(layer_logits, np.float64)
                for z in logits:
                    top = np.argsort(-z, kind="stable")[:k]
                    rel = np.exp(z[top] - z[top].max())
                    rel /= rel.sum()
                    p = np.exp(z - z.max())
                    p /= p.sum()
                    for i, r in zip(top, rel):
                        if r >= threshold:
                            want[j][i] += p[i] if score == "prob" else z[i]
        n = sum(len(s) for s in seqs)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w / n, rtol=1e-4, atol=1e-6)


def test_subsets_retrieval_and_storage(tmp_path):
    scores = np.random.default_rng(0).random((3, 2, 6))
    scores[1, 1] = [0.5, 0.9, 0.5, 0.1, 0.5, 0.0]  # ties go to the lower index
    stats = TaskExperts(("a", "b", "c"), ("0", "1"), scores, experts_per_layer=3)
    np.testing.assert_array_equal(stats.kept("b")["1"], [0, 1, 2])
    for t, name in enumerate(stats.tasks):
        assert stats.retrieve(scores[t, 0] + 1e-3) == name
    stats.save(tmp_path / "p.npz")
    back = TaskExperts.load(tmp_path / "p.npz")
    assert back.tasks == stats.tasks and back.experts_per_layer == 3
    np.testing.assert_array_equal(back.scores, scores)
    with pytest.raises(ValueError, match="no PreMoe statistics for task 'd'"):
        stats.kept("d")
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="is not PreMoe statistics"):
        TaskExperts.load(tmp_path / "bad.npz")


def test_a_pruned_layer_is_the_full_router_over_the_kept_experts():
    from jmoe.experts import ffn
    from jmoe.routing.topk import router_logits

    moe = CFG.moe
    params = jmoe.init_moe(jax.random.key(1), moe)
    x = jax.random.normal(jax.random.key(2), (24, 32))
    keep = np.array([0, 2, 5])
    small, small_cfg = prune_to({"layers": {"0": {"moe": params}}}, CFG.replace(n_layers=1), {"0": keep})
    y, _ = jmoe.moe_layer(small["layers"]["0"]["moe"], x, small_cfg.moe_for(0))
    # reference: the full router's softmax over the kept experts' logits, top-k, weighted sum
    z = np.asarray(router_logits(params["router"], x, moe, None), np.float64)[:, keep]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ref = np.zeros((24, 32))
    for t in range(24):
        for i in np.argsort(-p[t], kind="stable")[: moe.top_k]:
            one = jax.tree.map(lambda a, e=keep[i]: a[e], params["experts"])
            ref[t] += p[t, i] * np.asarray(ffn(one, x[t:t + 1], moe.activation))[0]
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    from tests.train.conftest import MICRO

    run = tmp_path_factory.mktemp("runs") / "src"
    assert main(["train", "--out", str(run), "--steps", "6", "--eval-every", "6", "--ckpt-every", "6", "--quiet",
                 *MICRO]) == 0
    return run


def test_premoe_runs_are_stored_and_served(source_run, tmp_path, capsys):
    out = tmp_path / "pre"
    assert main(["compress", "--ckpt", str(source_run), "--out", str(out), "--method", "premoe",
                 "--experts-per-layer", "2", "--tasks", "addition,reversal,prose", "--examples", "8", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"] == ["addition", "reversal", "prose"]
    assert all(len(v) == 2 for kept in report["kept"].values() for v in kept.values())
    assert json.loads((out / "config.json").read_text())["premoe"]["experts_per_layer"] == 2
    capsys.readouterr()
    gen = ["generate", "--ckpt", str(out), "--prompt", "12+34=", "--max-new-tokens", "4", "--temperature", "0", "--json",
           "--quiet"]
    assert main(gen) == 0
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[-1])["expert_subset"] in report["tasks"]
    assert main([*gen, "--expert-subset", "prose"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["expert_subset"] == "prose"
    assert main([*gen, "--expert-subset", "all"]) == 0
    assert "expert_subset" not in json.loads(capsys.readouterr().out.splitlines()[-1])
    # the subset a task keeps is what runs
    from jmoe.infer.load import open_model, select_experts

    source = open_model(out)
    model, task = select_experts(source.load(), source.task_experts, "reversal")
    assert task == "reversal"
    assert [model.cfg.moe_for(i).num_experts for i in model.cfg.moe_layers] == [2, 2]
    assert main(["evaluate", "--ckpt", str(out), "--tasks", "addition,prose", "--examples", "4", "--max-windows", "2",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert all(r["expert_subset"] in report["tasks"] for r in record["results"])

    # quantized, the run keeps its task statistics, and a subset slices the quantized experts
    q = tmp_path / "pre-q"
    assert main(["quantize", "--ckpt", str(out), "--out", str(q), "--bits", "4", "--group-size", "16", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(q), "--prompt", "12+34=", "--max-new-tokens", "4", "--temperature", "0",
                 "--json", "--quiet", "--expert-subset", "reversal"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["expert_subset"] == "reversal"

    # what is refused
    assert main([*gen, "--expert-subset", "sorting"]) == 2
    assert "no PreMoe statistics for task 'sorting'" in capsys.readouterr().err
    for argv, message in [
        (["--experts-per-layer", "1", "--tasks", "addition"], "must be in [top-k = 2, 4]"),
        (["--experts-per-layer", "2"], "needs --tasks"),
        (["--experts-per-layer", "2", "--tasks", "nope"], "nope"),
        (["--experts-per-layer", "2", "--tasks", "addition", "--target-experts", "2"], "does not apply"),
    ]:
        dest = tmp_path / "bad"
        assert main(["compress", "--ckpt", str(source_run), "--out", str(dest), "--method", "premoe", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and not dest.exists(), err
    assert main(["generate", "--ckpt", str(source_run), "--expert-subset", "addition"]) == 2
    assert "has no PreMoe task statistics" in capsys.readouterr().err
