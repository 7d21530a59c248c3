"""Expert merging, compression, pruning and upcycling (jmoe.merge.experts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.experts import ffn
from jmoe.merge import experts as mx
from jmoe.nn import LMConfig, init_lm, lm_apply

CFG = LMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16,
               moe=MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8))
BATCHES = [np.random.default_rng(i).integers(0, 32, (2, 17)) for i in range(3)]
TOKENS = jnp.asarray(BATCHES[0][:, :16])


def logits(params, cfg):
    return np.asarray(lm_apply(params, TOKENS, cfg)[0])


def one_expert(key, d=16, f=8, activation="swiglu"):
    ks = jax.random.split(key, 3)
    p = {"w_up": np.asarray(jax.random.normal(ks[0], (d, f))), "w_down": np.asarray(jax.random.normal(ks[1], (f, d)))}
    if activation in ("swiglu", "geglu"):
        p["w_gate"] = np.asarray(jax.random.normal(ks[2], (d, f)))
    return p


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_permuting_an_expert_keeps_its_function(activation):
    p = one_expert(jax.random.key(0), activation=activation)
    perm = np.random.default_rng(0).permutation(8)
    x = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    q = mx.permute_expert(p, perm)
    assert not np.allclose(q["w_up"], p["w_up"])
    np.testing.assert_allclose(ffn(q, x, activation), ffn(p, x, activation), rtol=1e-5, atol=1e-5)


def test_weight_and_activation_matching_recover_a_hidden_permutation():
    ref = one_expert(jax.random.key(0))
    perm = np.random.default_rng(0).permutation(8)
    shuffled = mx.permute_expert(ref, perm)
    p = mx.weight_matching(ref, shuffled)
    np.testing.assert_array_equal(mx.permute_expert(shuffled, p)["w_up"], ref["w_up"])
    x = np.random.default_rng(1).normal(size=(64, 16))
    p = mx.activation_matching(ref, shuffled, x)
    np.testing.assert_array_equal(mx.permute_expert(shuffled, p)["w_down"], ref["w_down"])


def test_frequency_weighted_merge_normalises_within_each_group():
    E = {n: np.stack([np.full_like(v, e) for e in range(4)]) for n, v in one_expert(jax.random.key(0)).items()}
    labels = np.array([0, 1, 0, 1])
    merged = mx.merge_groups(E, labels, np.array([1.0, 0.0, 3.0, 0.0]), align=None)
    np.testing.assert_allclose(merged["w_up"][0], 0.25 * 0 + 0.75 * 2)  # weights 1:3 of experts 0 and 2
    np.testing.assert_allclose(merged["w_up"][1], 2.0)  # a never-used group: uniform mean of 1 and 3
    with pytest.raises(ValueError, match="group 1 has no experts"):
        mx.merge_groups(E, np.array([0, 0, 2, 2]), np.ones(4), align=None)
    with pytest.raises(ValueError, match="labels must give each of the 4 experts a group"):
        mx.merge_groups(E, np.array([0, 1]), np.ones(4), align=None)
    with pytest.raises(ValueError, match="weights must hold one weight per expert"):
        mx.merge_groups(E, labels, np.ones(3), align=None)
    with pytest.raises(ValueError, match="align='activation' needs calib"):
        mx.merge_groups(E, labels, np.ones(4), align="activation")


def test_merging_permuted_copies_of_one_expert_gives_that_expert_and_the_same_model():
    params = init_lm(jax.random.key(0), CFG)
    rng = np.random.default_rng(0)
    for l in ("0", "1"):
        ex = {n: np.asarray(v) for n, v in params["layers"][l]["moe"]["experts"].items()}
        base = {n: v[0] for n, v in ex.items()}
        copies = [mx.permute_expert(base, rng.permutation(8)) for _ in range(4)]
        params["layers"][l]["moe"]["experts"] = {n: jnp.stack([c[n] for c in copies]) for n in ex}
    stats = mx.collect_routing_stats(params, CFG, BATCHES)
    merged, cfg2, groups = mx.merge_experts(params, CFG, stats, 2, method="msmoe", router="share")
    assert [m.num_experts for _, m in cfg2.layer_moe] == [2, 2]
    np.testing.assert_allclose(logits(merged, cfg2), logits(params, CFG), rtol=1e-4, atol=1e-4)
    # without alignment the average of permuted copies is a different function
    avg, cfg3, _ = mx.merge_experts(params, CFG, stats, 2, method="average", router="share")
    assert np.abs(logits(avg, cfg3) - logits(params, CFG)).max() > 1e-3


def test_routing_stats_shares_save_and_load(tmp_path):
    params = init_lm(jax.random.key(0), CFG)
    stats = mx.collect_routing_stats(params, CFG, BATCHES)
    tokens = 3 * 2 * 16
    for s in stats["layers"].values():
        assert s["top1"].sum() == tokens and s["topk"].sum() == 2 * tokens
        np.testing.assert_allclose(s["topk_share"].sum(), 1.0)
        assert s["logits"].shape == (tokens, 4)
    assert stats["coactivation"]["0->1"].sum() == tokens
    back = mx.load_stats(mx.save_stats(stats, tmp_path / "stats.npz"))
    assert back["tokens"] == stats["tokens"]
    np.testing.assert_array_equal(back["layers"]["1"]["logits"], stats["layers"]["1"]["logits"])
    inputs = mx.collect_expert_inputs(params, CFG, BATCHES, max_per_expert=10)
    assert all(v.shape[1] == 16 and 0 < v.shape[0] <= 10 for d in inputs.values() for v in d.values())


def test_global_budget_and_grouping():
    shares = {"0": np.array([0.7, 0.1, 0.1, 0.1]), "1": np.array([0.35, 0.3, 0.2, 0.15])}
    k = mx.allocate_dominant(shares, 2)
    assert k == {"0": 1, "1": 3}  # the peaked layer keeps one expert, the flat one three
    assert mx.allocate_dominant(shares, 4) == {"0": 4, "1": 4}
    assert mx.allocate_dominant(shares, 1) == {"0": 1, "1": 1}
    sim = np.eye(4)
    sim[3, 1] = sim[2, 0] = 0.9
    labels = mx.group_by_routing(np.array([0.4, 0.3, 0.2, 0.1]), sim, 2)
    np.testing.assert_array_equal(labels, [0, 1, 0, 1])


def test_router_merge_averages_columns_by_frequency():
    params = init_lm(jax.random.key(0), CFG)
    stats = mx.collect_routing_stats(params, CFG, BATCHES)
    merged, cfg2, groups = mx.merge_experts(params, CFG, stats, 2, method="msmoe", router="merge")
    for l, labels in groups.items():
        moe = cfg2.moe_for(int(l))
        assert moe.expert_map is None and moe.num_experts == labels.max() + 1
        w = np.asarray(params["layers"][l]["moe"]["router"]["w"])
        f = stats["layers"][l]["topk_share"]
        for g in range(moe.num_experts):
            m = labels == g
            np.testing.assert_allclose(merged["layers"][l]["moe"]["router"]["w"][:, g], w[:, m] @ (f[m] / f[m].sum()),
                                       rtol=1e-5, atol=1e-6)
    assert logits(merged, cfg2).shape == (2, 16, 32)


def test_pruning_to_every_expert_is_the_identity_and_fewer_keeps_the_most_used():
    params = init_lm(jax.random.key(0), CFG)
    stats = mx.collect_routing_stats(params, CFG, BATCHES)
    same, cfg2, kept = mx.prune_experts(params, CFG, stats, 4)
    np.testing.assert_allclose(logits(same, cfg2), logits(params, CFG), rtol=1e-6, atol=1e-6)
    fewer, cfg3, kept = mx.prune_experts(params, CFG, stats, 2)
    for l, keep in kept.items():
        share = stats["layers"][l]["topk_share"]
        assert share[keep].min() >= np.delete(share, keep).max()
        np.testing.assert_array_equal(fewer["layers"][l]["moe"]["router"]["w"],
                                      np.asarray(params["layers"][l]["moe"]["router"]["w"])[:, keep])
    assert sum(len(k) for k in kept.values()) == 4
    assert logits(fewer, cfg3).shape == (2, 16, 32)


def test_compression_is_exact_at_full_rank_or_no_sparsity_and_smaller_otherwise():
    params = init_lm(jax.random.key(0), CFG)
    for rank, sparsity in [(8, 1.0), (0, 0.0), (3, 0.0)]:
        out, factors, report = mx.compress_experts(params, CFG, rank=rank, sparsity=sparsity)
        np.testing.assert_allclose(logits(out, CFG), logits(params, CFG), rtol=1e-4, atol=1e-4)
    out, factors, report = mx.compress_experts(params, CFG, rank=2, sparsity=0.75)
    assert report["expert_params_after"] < report["expert_params_before"]
    f = factors["0"]["w_up"]
    assert f["L"].shape == (4, 16, 2) and f["R"].shape == (4, 2, 8)
    rebuilt = f["L"][1] @ f["R"][1]
    rebuilt[:, f["cols"][1]] += f["S"][1]
    np.testing.assert_allclose(rebuilt, out["layers"]["0"]["moe"]["experts"]["w_up"][1], rtol=1e-5, atol=1e-5)
    kept = sum(c.size * 16 for c in f["cols"])  # about a quarter of the residual columns survive (global threshold)
    assert 0 <= kept <= 4 * 16 * 8
    grads = mx.expert_gradients(params, CFG, BATCHES[:1])
    assert grads["1"]["w_down"].shape == (4, 8, 16)
    _, _, rep2 = mx.compress_experts(params, CFG, rank=2, sparsity=0.75, importance="sensitivity", grads=grads)
    assert rep2["expert_params_after"] == pytest.approx(report["expert_params_after"], rel=0.1)


def test_sparse_residual_keeps_the_most_important_columns():
    W = np.zeros((1, 4, 3))
    W[0, :, 2] = 5.0
    W[0, :, 0] = 1.0
    params = {"layers": {"0": {"moe": {"experts": {"w_up": W, "w_down": W.transpose(0, 2, 1)}}}}}
    cfg = LMConfig(vocab_size=8, d_model=4, n_layers=1, n_heads=1, d_ff=8,
                   moe=MoEConfig(num_experts=1, top_k=1, d_model=4, d_ff=3, activation="gelu"))
    out, f, _ = mx.compress_experts(params, cfg, rank=0, sparsity=0.8)
    np.testing.assert_array_equal(f["0"]["w_up"]["cols"][0], [2])  # the largest column only
    np.testing.assert_allclose(out["layers"]["0"]["moe"]["experts"]["w_up"][0][:, 2], 5.0)
    np.testing.assert_allclose(out["layers"]["0"]["moe"]["experts"]["w_up"][0][:, 0], 0.0)


def test_upcycled_model_computes_the_dense_model_and_bam_takes_each_fine_tunes_ffn():
    dense = CFG.replace(moe=None)
    params = init_lm(jax.random.key(0), dense)
    up, ucfg = mx.upcycle(params, dense, num_experts=4, top_k=2, key=jax.random.key(1))
    assert ucfg.moe.num_experts == 4 and up["layers"]["0"]["moe"]["experts"]["w_up"].shape == (4, 16, 32)
    np.testing.assert_allclose(logits(up, ucfg), logits(params, dense), rtol=1e-5, atol=1e-5)
    noisy, _ = mx.upcycle(params, dense, num_experts=4, top_k=2, key=jax.random.key(1), noise=0.1)
    assert np.abs(logits(noisy, ucfg) - logits(params, dense)).max() > 1e-4
    partial, pcfg = mx.upcycle(params, dense, num_experts=4, top_k=1, key=jax.random.key(1), layers=[1])
    assert list(pcfg.moe_layers) == [1] and "ffn" in partial["layers"]["0"]
    fts = [params, init_lm(jax.random.key(2), dense)]
    merged, bcfg = mx.bam(fts, dense, top_k=1, key=jax.random.key(3))
    np.testing.assert_array_equal(merged["layers"]["1"]["moe"]["experts"]["w_down"][1], fts[1]["layers"]["1"]["ffn"]["w_down"])
    np.testing.assert_allclose(merged["embed"]["w"], (fts[0]["embed"]["w"] + fts[1]["embed"]["w"]) / 2, rtol=1e-6)
    same, scfg = mx.bam([params, params], dense, top_k=2, key=jax.random.key(3))
    np.testing.assert_allclose(logits(same, scfg), logits(params, dense), rtol=1e-5, atol=1e-5)


def test_partitioned_experts_are_slices_that_sum_to_the_dense_ffn():
    dense = CFG.replace(moe=None)  # d_ff 32
    params = init_lm(jax.random.key(0), dense)
    full, fcfg = mx.partition(params, dense, num_experts=4, top_k=4)
    ex = full["layers"]["0"]["moe"]["experts"]
    assert ex["w_gate"].shape == (4, 16, 8) and ex["w_down"].shape == (4, 8, 16)
    np.testing.assert_array_equal(ex["w_up"][1], params["layers"]["0"]["ffn"]["w_up"][:, 8:16])
    np.testing.assert_array_equal(ex["w_down"][3], params["layers"]["0"]["ffn"]["w_down"][24:])
    np.testing.assert_allclose(logits(full, fcfg), logits(params, dense), rtol=1e-5, atol=1e-5)
    half, hcfg = mx.partition(params, dense, num_experts=4, top_k=2, layers=[1])
    assert list(hcfg.moe_layers) == [1] and hcfg.moe.router_options.route_scale == 2.0
    from jmoe.layer import moe_layer

    x = jax.random.normal(jax.random.key(5), (6, 16))
    y, aux = moe_layer(half["layers"]["1"]["moe"], x, hcfg.moe)
    ffn = params["layers"]["1"]["ffn"]
    chosen = np.asarray(aux.routing.expert_ids)
    want = sum(jax.nn.silu(x @ ffn["w_gate"][:, 8 * e:8 * e + 8]) * (x @ ffn["w_up"][:, 8 * e:8 * e + 8])
               @ ffn["w_down"][8 * e:8 * e + 8] * (chosen == e).any(-1, keepdims=True) for e in range(4))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)  # each selected slice counts once
    with pytest.raises(ValueError, match="must divide the FFN width"):
        mx.partition(params, dense, num_experts=5, top_k=2)
    with pytest.raises(ValueError, match="dense model"):
        mx.partition(full, fcfg, num_experts=4, top_k=2)


def test_bad_inputs_get_clear_errors():
    params = init_lm(jax.random.key(0), CFG)
    stats = mx.collect_routing_stats(params, CFG, BATCHES[:1])
    with pytest.raises(ValueError, match="target_experts=9"):
        mx.merge_experts(params, CFG, stats, 9)
    with pytest.raises(ValueError, match="method='ties'"):
        mx.merge_experts(params, CFG, stats, 2, method="ties")
    with pytest.raises(ValueError, match="router='both'"):
        mx.merge_experts(params, CFG, stats, 2, router="both")
    merged, cfg2, _ = mx.merge_experts(params, CFG, stats, 2)
    with pytest.raises(ValueError, match="already merged"):
        mx.merge_experts(merged, cfg2, stats, 2)
    with pytest.raises(ValueError, match="rank=9"):
        mx.compress_experts(params, CFG, rank=9, sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity=1.5"):
        mx.compress_experts(params, CFG, rank=2, sparsity=1.5)
    with pytest.raises(ValueError, match="needs grads"):
        mx.compress_experts(params, CFG, rank=2, sparsity=0.5, importance="sensitivity")
    with pytest.raises(ValueError, match="keep="):
        mx.prune_layer(params["layers"]["0"]["moe"], CFG.moe, [0, 0])
    with pytest.raises(ValueError, match="dense model"):
        mx.upcycle(params, CFG, num_experts=4, top_k=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="at least one calibration batch"):
        mx.collect_routing_stats(params, CFG, [])
    with pytest.raises(ValueError, match="expert_map entries"):
        CFG.moe.replace(expert_map=(0, 4))
    for bad_stats in ({}, {"layers": {}}):
        with pytest.raises(ValueError, match="stats"):
            mx.merge_experts(params, CFG, bad_stats, 2)
        with pytest.raises(ValueError, match="stats"):
            mx.prune_experts(params, CFG, bad_stats, 2)
    with pytest.raises(ValueError, match="keep must be a list of expert indices"):
        mx.prune_layer(params["layers"]["0"]["moe"], CFG.moe, [0.9, 2.5])
    with pytest.raises(ValueError, match=r"batches\[0\] holds token ids in \[\d+, 99\], outside the vocabulary"):
        mx.collect_routing_stats(params, CFG, [np.full((1, 5), 99)])
    with pytest.raises(ValueError, match=r"batches\[0\] must be a non-empty integer token array"):
        mx.collect_routing_stats(params, CFG, [np.arange(5)])
    dense_cfg = CFG.replace(moe=None)
    dense = init_lm(jax.random.key(1), dense_cfg)
    for call in (lambda: mx.upcycle(dense, dense_cfg, num_experts=4, top_k=2, key=jax.random.key(0), layers=[5]),
                 lambda: mx.partition(dense, dense_cfg, num_experts=4, top_k=2, layers=[5])):
        with pytest.raises(ValueError, match="layers=\\[5\\]: 5 is not a layer of the 2-layer model"):
            call()
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        mx.upcycle(dense, dense_cfg, num_experts=4, top_k=2, key=0)
    other = jax.tree.map(lambda a: a, dense)
    other["embed"]["w"] = jnp.zeros((33, 16))
    with pytest.raises(ValueError, match=r"models\[1\]\['embed'\]\['w'\] has shape \(33, 16\)"):
        mx.bam([dense, other], dense_cfg, top_k=1, key=jax.random.key(0))


def test_layers_with_different_expert_counts_evaluate_and_train():
    from jmoe.train import TrainConfig
    from jmoe.train.trainer import evaluate, make_optimizer, make_train_step

    params = init_lm(jax.random.key(0), CFG)
    moe0, cfg0 = mx.prune_layer(params["layers"]["0"]["moe"], CFG.moe, [0, 2, 3])
    params["layers"]["0"]["moe"] = jax.tree.map(jnp.asarray, moe0)
    cfg = CFG.replace(layer_moe=((0, cfg0),))
    batches = np.stack([b[:, :17] for b in BATCHES[:2]])
    ev = evaluate(params, None, cfg, batches)
    assert [len(l) for l in ev["load"]] == [3, 4] and np.isfinite(ev["val_loss"])
    tc = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1)
    tx, schedule = make_optimizer(tc)
    state = {"step": jnp.zeros((), jnp.int32), "data_position": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": tx.init(params), "rng": jax.random.key_data(jax.random.key(0))}
    state, m = make_train_step(cfg, tx, schedule)(state, jnp.asarray(batches[0]))
    assert m["load"].shape == (2, 4) and float(m["load"][0, 3]) == 0.0 and np.isfinite(float(m["loss"]))
