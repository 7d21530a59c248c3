"""Hugging Face MoE checkpoints: logits equal to transformers', exact round trips, and
merged checkpoints that transformers still loads."""

import json
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jmoe.io import hf, load_safetensors  # noqa: E402
from jmoe.nn import lm_apply  # noqa: E402
from tests.util import jit_lm_apply  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)
MLA = dict(intermediate_size=32, moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
           first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4)
CONFIGS = {
    "mixtral": lambda: T.MixtralConfig(**COMMON, num_key_value_heads=2, intermediate_size=32, num_local_experts=4,
                                       num_experts_per_tok=2),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**COMMON, num_key_value_heads=2, intermediate_size=32, moe_intermediate_size=8,
                                          shared_expert_intermediate_size=12, num_experts=4, num_experts_per_tok=2,
                                          mlp_only_layers=[1], norm_topk_prob=True),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**COMMON, num_key_value_heads=2, intermediate_size=32, moe_intermediate_size=8,
                                          num_experts=4, num_experts_per_tok=2, head_dim=8, tie_word_embeddings=True),
    "olmoe": lambda: T.OlmoeConfig(**COMMON, num_key_value_heads=4, intermediate_size=32, num_experts=4,
                                   num_experts_per_tok=2, clip_qkv=2.0),
    "deepseek_v2": lambda: T.DeepseekV2Config(**{**COMMON, **MLA, "q_lora_rank": None}, n_group=2, topk_group=1,
                                              topk_method="group_limited_greedy", routed_scaling_factor=1.5),
    "llama": lambda: T.LlamaConfig(**COMMON, num_key_value_heads=2, intermediate_size=24,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": lambda: T.MistralConfig(**COMMON, num_key_value_heads=1, intermediate_size=24, sliding_window=32),
    "qwen2": lambda: T.Qwen2Config(**COMMON, num_key_value_heads=2, intermediate_size=24, tie_word_embeddings=True),
    "qwen3": lambda: T.Qwen3Config(**COMMON, num_key_value_heads=2, intermediate_size=24, head_dim=8),
    "deepseek_v3": lambda: T.DeepseekV3Config(**COMMON, **MLA, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                              rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                            "original_max_position_embeddings": 16,
                                                            "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def build(arch, tmp_path, seed=0):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    out = tmp_path / f"{arch}-{seed}"
    model.save_pretrained(out)
    return model, out


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


IDS = np.random.default_rng(0).integers(0, 64, (2, 12))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_logits_match_transformers(arch, tmp_path):
    model, path = build(arch, tmp_path)
    cfg, params = hf.load(path)
    logits, aux = jit_lm_apply(params, jnp.asarray(IDS), cfg)
    np.testing.assert_allclose(np.asarray(logits), hf_logits(model, IDS), atol=1e-4, rtol=1e-4)
    assert len(aux.moe) == len(cfg.moe_layers)
    assert (cfg.moe is None) == (arch in hf.DENSE_ARCHITECTURES)
    module = hf.load_model(path)
    np.testing.assert_allclose(np.asarray(module(jnp.asarray(IDS))[0]), np.asarray(logits), atol=1e-6)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_round_trip_gives_identical_tensors(arch, tmp_path):
    model, path = build(arch, tmp_path)
    cfg, params = hf.load(path)
    hf.save(tmp_path / "back", cfg, params, max_shard_size=20_000)
    original = load_safetensors(path, lazy=False)
    back = load_safetensors(tmp_path / "back", lazy=False)
    assert set(back) == set(original)
    for name in original:
        assert back[name].dtype == original[name].dtype
        np.testing.assert_array_equal(back[name], original[name], err_msg=name)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    np.testing.assert_allclose(hf_logits(reloaded, IDS), hf_logits(model, IDS), atol=1e-6)


def test_streamed_conversion(tmp_path):
    _, path = build("deepseek_v3", tmp_path)
    cfg, params = hf.load(path)
    out = hf.convert(path, tmp_path / "jmoe", max_shard_size=4000)
    cfg2, params2 = hf.load_converted(out)
    assert cfg2 == cfg
    np.testing.assert_array_equal(params2["layers"]["2"]["moe"]["experts"]["w_up"], params["layers"]["2"]["moe"]["experts"]["w_up"])
    assert params["layers"]["2"]["moe"]["experts"]["w_up"].shape == (4, 16, 8)
    # parameters arrive on the device (jitted calls then reuse them without a copy) unless asked not to
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(params) + jax.tree.leaves(params2))
    _, host = hf.load(path, on_device=False)
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(host))
    np.testing.assert_array_equal(host["embed"]["w"], params["embed"]["w"])


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_a_jmoe_merged_checkpoint_loads_in_transformers(arch, tmp_path):
    from jmoe.cli import main

    base_model, base = build(arch, tmp_path, seed=0)
    _, ft1 = build(arch, tmp_path, seed=1)
    _, ft2 = build(arch, tmp_path, seed=2)
    cfg_file = tmp_path / "merge.yml"
    cfg_file.write_text(textwrap.dedent(f"""
        merge_method: ties
        base_model: {base}
        models:
          - {{model: {ft1}, parameters: {{density: 0.5, weight: 1.0}}}}
          - {{model: {ft2}, parameters: {{density: 0.5, weight: 0.5}}}}
    """))
    assert main(["merge", str(cfg_file), str(tmp_path / "merged"), "--quiet"]) == 0
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ours, params = hf.load(tmp_path / "merged")
    np.testing.assert_allclose(np.asarray(lm_apply(params, jnp.asarray(IDS), ours)[0]), hf_logits(merged, IDS),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_merged_and_compressed_experts_load_in_transformers(arch, tmp_path):
    from jmoe.merge import experts as mx

    _, path = build(arch, tmp_path)
    cfg, params = hf.load(path)
    batches = [np.random.default_rng(i).integers(0, 64, (2, 12)) for i in range(2)]
    stats = mx.collect_routing_stats(params, cfg, batches)
    merged, mcfg, _ = mx.merge_experts(params, cfg, stats, 2, method="msmoe", router="share")
    compressed, _, report = mx.compress_experts(merged, mcfg, rank=2, sparsity=0.5)
    assert report["expert_ratio"] < 1
    ours = np.asarray(lm_apply(compressed, jnp.asarray(IDS), mcfg)[0])
    hf.save(tmp_path / "mc", mcfg, compressed)
    theirs = T.AutoModelForCausalLM.from_pretrained(tmp_path / "mc").eval()
    np.testing.assert_allclose(hf_logits(theirs, IDS), ours, atol=1e-4, rtol=1e-4)
    # the router-merged variant exports with fewer experts where every layer has the same count
    fewer, fcfg, _ = mx.merge_experts(params, cfg, stats, 2, method="random", router="merge")  # 2 in every layer
    hf.save(tmp_path / "fewer", fcfg, fewer)
    theirs = T.AutoModelForCausalLM.from_pretrained(tmp_path / "fewer").eval()
    assert len(load_safetensors(tmp_path / "fewer", lazy=True)) < len(load_safetensors(path, lazy=True))
    np.testing.assert_allclose(hf_logits(theirs, IDS), np.asarray(lm_apply(fewer, jnp.asarray(IDS), fcfg)[0]),
                               atol=1e-4, rtol=1e-4)
    uneven = cfg.replace(layer_moe=((cfg.moe_layers[0], cfg.moe_for(cfg.moe_layers[0]).replace(num_experts=3)),))
    with pytest.raises(ValueError, match="one MoE shape for all layers"):
        hf.save(tmp_path / "uneven", uneven, params)


def test_clear_errors(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture.*supported: mixtral"):
        hf.load(tmp_path / "odd")
    _, path = build("mixtral", tmp_path)
    tensors = load_safetensors(path, lazy=False)
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"], tensors["model.norm.weight"]
    from jmoe.io import save_safetensors

    broken = tmp_path / "broken"
    save_safetensors(tensors, broken)
    (broken / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing 2 tensor\(s\).*model.norm.weight.*experts.2.w3"):
        hf.load(broken)
    with pytest.raises(ValueError, match="no config.json"):
        hf.load(tmp_path)


def test_a_sliding_window_bounds_the_context_and_survives_the_round_trip(tmp_path):
    _, path = build("mistral", tmp_path)
    cfg, params = hf.load(path)
    assert cfg.max_seq_len == 32 and cfg.moe is None  # the window (32) is shorter than the 64 positions
    hf.save(tmp_path / "back", cfg, params)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["max_position_embeddings"] == 64 and back["sliding_window"] == 32
    assert back["architectures"] == ["MistralForCausalLM"]


def test_dense_architectures_refuse_what_they_cannot_compute(tmp_path):
    model = T.AutoModelForCausalLM.from_config(T.LlamaConfig(**COMMON, intermediate_size=24, attention_bias=True))
    model.save_pretrained(tmp_path / "biased")
    with pytest.raises(ValueError, match="attention_bias=true is not supported for llama"):
        hf.load(tmp_path / "biased")
    cfg, params = hf.load(build("mixtral", tmp_path)[1])
    with pytest.raises(ValueError, match="a dense Hugging Face architecture cannot hold MoE layers"):
        hf.save(tmp_path / "out", cfg, params, architecture="llama")
    assert not (tmp_path / "out").exists()
