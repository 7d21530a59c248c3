"""`jmoe moe-build`: MoE models from dense ones (mergekit-moe). Router rows equal mergekit's
recipe computed with transformers; the outputs load in transformers with equal logits; a jmoe
base gives a run; bad configurations are one line and write nothing."""

import json

import jax
import numpy as np
import pytest
import yaml

from jmoe.cli import main
from jmoe.merge.moe_build import gate_vectors, parse_build_config
from tests.util import jit_lm_apply, write_bpe_tokenizer

TEXTS = ["def add(a, b): return a + b", "the cat sat on the mat", "SELECT name FROM users WHERE id = 1"]
PROMPTS = {"code": ["def f(x):", "import numpy as np"], "prose": ["the dog ran", "once upon a time"],
           "sql": ["SELECT * FROM t", "INSERT INTO users"]}


def write_config(tmp_path, **top):
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(top, sort_keys=False))
    return path


def experts(names, dirs, **extra):
    return [{"source_model": str(dirs[n]), "positive_prompts": PROMPTS[n], **extra.get(n, {})} for n in names]


def tiny_llamas(root, names, moved):
    """Tiny Llamas made from one seed, the first the base; in model j > 0 every weight whose
    name `moved` accepts gets + 0.05 N(0, 1) (seed j), like a fine-tune of the base."""
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    dirs = {}
    for j, name in enumerate(names):
        torch.manual_seed(0)
        model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=280, hidden_size=32, intermediate_size=48,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=64, bos_token_id=0, eos_token_id=1))
        if j:
            torch.manual_seed(j)
            with torch.no_grad():
                for n, w in model.named_parameters():
                    if moved(n):
                        w.add_(0.05 * torch.randn_like(w))
        d = root / name
        model.save_pretrained(d)
        assert write_bpe_tokenizer(d, TEXTS * 3, vocab_size=280) <= 280
        dirs[name] = d
    return dirs


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A tiny Llama base and three 'fine-tunes' of it (the base with other FFNs)."""
    return tiny_llamas(tmp_path_factory.mktemp("dense"), ["base", "code", "prose", "sql"], lambda n: ".mlp." in n)


def test_router_rows_are_mergekits_and_the_mixtral_loads_in_transformers(llamas, tmp_path):
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    from jmoe.infer.tokenizer import load_tokenizer
    from jmoe.io import hf

    neg = {"sql": {"negative_prompts": ["the cat"], "residual_scale": 0.5}}
    cfg_path = write_config(tmp_path, base_model=str(llamas["base"]), gate_mode="hidden", experts_per_token=2,
                            experts=experts(["code", "prose", "sql"], llamas, **neg))
    out = tmp_path / "moe"
    assert main(["moe-build", str(cfg_path), str(out), "--quiet"]) == 0

    # mergekit's recipe with transformers: the input of each layer at the last token of BOS + prompt,
    # averaged over the prompts, minus the negative prompts' mean, L2-normalised
    base = T.AutoModelForCausalLM.from_pretrained(llamas["base"]).eval()
    tok = load_tokenizer(llamas["base"])

    def mean_hidden(prompts):
        vs = []
        for p in prompts:
            ids = torch.tensor([[0] + tok.encode(p, add_special_tokens=False)])
            with torch.no_grad():
                hs = base(ids, output_hidden_states=True).hidden_states[:-1]
            vs.append(torch.stack([h[0, -1] for h in hs]).numpy())
        return np.mean(vs, axis=0)

    built = T.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(built).__name__ == "MixtralForCausalLM" and built.config.num_local_experts == 3
    for e, name in enumerate(["code", "prose", "sql"]):
        v = mean_hidden(PROMPTS[name]) - (mean_hidden(["the cat"]) if name == "sql" else 0)
        v = v / np.linalg.norm(v, axis=-1, keepdims=True)
        for layer in range(2):
            got = built.model.layers[layer].mlp.gate.weight[e].detach().numpy()
            np.testing.assert_allclose(got, v[layer], rtol=1e-4, atol=1e-5)
    # experts are the sources' FFNs (residual_scale on down), attention the base's
    src = T.AutoModelForCausalLM.from_pretrained(llamas["sql"])
    experts_mod = built.model.layers[1].mlp.experts
    sd = {k: v for k, v in built.state_dict().items() if "layers.1.mlp.experts" in k}
    down = [v for k, v in sd.items() if "down" in k or "w2" in k][0]
    want_down = src.model.layers[1].mlp.down_proj.weight.detach().numpy() * 0.5
    assert np.allclose(down[2].detach().numpy().reshape(want_down.shape), want_down, atol=1e-6) or \
        np.allclose(down[2].detach().numpy().T, want_down, atol=1e-6), type(experts_mod)
    np.testing.assert_array_equal(built.model.layers[0].self_attn.q_proj.weight.detach().numpy(),
                                  base.model.layers[0].self_attn.q_proj.weight.detach().numpy())
    # transformers and jmoe compute the same model; the tokenizer came along
    cfg, params = hf.load(out)
    ids = np.random.default_rng(0).integers(0, 280, (2, 12))
    with torch.no_grad():
        want = built(torch.tensor(ids)).logits.numpy()
    got, _ = jit_lm_apply(params, ids, cfg)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
    assert (out / "tokenizer.json").is_file()
    report = json.loads((out / "moe_build_report.json").read_text())
    assert report["architecture"] == "mixtral" and len(report["prompt_routing"]["top1_own_expert"]) == 2


def test_qwen2_with_a_gated_shared_expert_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    from jmoe.io import hf

    dirs = {}
    for j, name in enumerate(["base", "code", "prose"]):
        torch.manual_seed(j)
        model = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=280, hidden_size=32, intermediate_size=40,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=64, bos_token_id=0, eos_token_id=1))
        model.save_pretrained(tmp_path / name)
        write_bpe_tokenizer(tmp_path / name, TEXTS, vocab_size=280)
        dirs[name] = tmp_path / name
    cfg_path = write_config(tmp_path, base_model="base", gate_mode="hidden_avg", experts_per_token=1,
                            experts=experts(["code", "prose"], dirs),
                            shared_experts=[{"source_model": "base", "positive_prompts": ["def", "the"]}])
    out = tmp_path / "qmoe"
    assert main(["moe-build", str(cfg_path), str(out), "--quiet"]) == 0
    built = T.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(built).__name__ == "Qwen2MoeForCausalLM"
    cfg, params = hf.load(out)
    assert cfg.moe.num_shared_experts == 1 and cfg.moe.shared_gate
    ids = np.random.default_rng(1).integers(0, 280, (2, 12))
    with torch.no_grad():
        want = built(torch.tensor(ids)).logits.numpy()
    got, _ = jit_lm_apply(params, ids, cfg)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_hidden_avg_ignores_padding_and_cheap_embed_is_one_row_for_all_layers():
    from jmoe.infer.tokenizer import ByteTokenizer
    from jmoe.merge.moe_build import ExpertSpec
    from jmoe.nn import init_lm
    from jmoe.nn.transformer import LMConfig

    cfg = LMConfig(vocab_size=256, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=32)
    params = init_lm(jax.random.key(0), cfg)
    tok = ByteTokenizer()
    both = [ExpertSpec(source=None, positive=("ab", "a much longer prompt"))]
    alone = [ExpertSpec(source=None, positive=(p,)) for p in both[0].positive]
    from jmoe.merge.moe_build import layer_inputs

    run = jax.jit(layer_inputs, static_argnums=2)
    for mode in ("hidden", "hidden_avg"):
        joint = gate_vectors(params, cfg, tok, both, mode)[:, 0]
        # the same mean from each prompt run on its own (no padding at all)
        per_prompt = []
        for s in alone:
            h = np.asarray(run(params, np.asarray([list(s.positive[0].encode())]), cfg))[:, 0]  # [L, S, d]
            per_prompt.append(h[:, -1] if mode == "hidden" else h.mean(1))
        sep = np.mean(per_prompt, axis=0)
        np.testing.assert_allclose(joint, sep / np.linalg.norm(sep, axis=-1, keepdims=True), rtol=1e-4, atol=1e-5)
    cheap = gate_vectors(params, cfg, tok, both, "cheap_embed")
    np.testing.assert_array_equal(cheap[0], cheap[1])
    np.testing.assert_allclose(np.linalg.norm(cheap, axis=-1), 1.0, rtol=1e-5)
    r1, r2 = (gate_vectors(params, cfg, tok, both * 2, "uniform_random", seed=s) for s in (0, 1))
    assert r1.shape == (2, 2, 16) and np.abs(r1).max() <= 1 / 4 and not np.array_equal(r1, r2)


@pytest.fixture(scope="module")
def jmoe_dense_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "dense"
    assert main(["train", "--out", str(run), "--steps", "2", "--eval-every", "2", "--ckpt-every", "2", "--quiet",
                 "--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
                 "--set", "model.d_ff=48", "--dense", "--batch-size", "2", "--seq-len", "16",
                 "--set", "train.eval_batches=1"]) == 0
    return run


def test_upcycling_a_jmoe_run_gives_a_run_that_computes_the_dense_model(jmoe_dense_run, tmp_path, capsys):
    from jmoe.train import load_run

    base = str(jmoe_dense_run)
    spec = [{"source_model": base}] * 4
    cfg_path = write_config(tmp_path, base_model=base, gate_mode="random", experts_per_token=2, experts=spec,
                            shared_experts=[{"source_model": base, "residual_scale": 0.0}])
    out = tmp_path / "up"
    assert main(["moe-build", str(cfg_path), str(out), "--quiet", "--allow-identical"]) == 0
    cfg, _, params, state, _, _ = load_run(out)
    dcfg, _, dparams, _, _, _ = load_run(jmoe_dense_run)
    assert cfg.moe.num_experts == 4 and cfg.moe.top_k == 2 and cfg.moe.shared_gate  # random gates: the shared one too
    ids = np.random.default_rng(0).integers(0, 256, (2, 16))
    got, _ = jit_lm_apply(params, ids, cfg, state=state)
    want, _ = jit_lm_apply(dparams, ids, dcfg)
    # copies of one FFN under renormalised top-k (and a zeroed shared expert) are the dense model
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out), "--json", "--batches", "1"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["val_loss"])

    # a router-only fine-tune moves the routers and nothing else
    tuned = tmp_path / "tuned"
    flags = ["--steps", "2", "--eval-every", "2", "--ckpt-every", "2", "--quiet", "--lr", "1e-2"]
    assert main(["train", "--out", str(tmp_path / "bad"), "--resume-from", str(out), "--train-only", "routr", *flags]) == 2
    assert "--train-only 'routr' names no parameter" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["train", "--out", str(tuned), "--resume-from", str(out), "--train-only", "router", *flags]) == 0
    _, tc, after, _, _, _ = load_run(tuned)
    assert tc.train_only == ("router",)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        moved = not np.array_equal(np.asarray(leaf), np.asarray(_at(after, path)))
        assert moved == ("router" in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)


def test_partitioning_a_jmoe_run_gives_a_run_of_ffn_slices(jmoe_dense_run, tmp_path, capsys):
    from jmoe.train import load_run

    full, half = tmp_path / "full", tmp_path / "half"
    assert main(["moe-build", str(jmoe_dense_run), str(full), "--partition", "4", "--top-k", "4", "--quiet"]) == 0
    assert main(["moe-build", str(jmoe_dense_run), str(half), "--partition", "4", "--quiet"]) == 0
    dcfg, _, dparams, _, _, _ = load_run(jmoe_dense_run)
    ids = np.random.default_rng(0).integers(0, 256, (2, 16))
    want, _ = jit_lm_apply(dparams, ids, dcfg)
    for out, k in ((full, 4), (half, 2)):
        cfg, _, params, _, _, _ = load_run(out)
        assert cfg.moe.num_experts == 4 and cfg.moe.top_k == k and cfg.moe.d_ff == 12
        got, _ = jit_lm_apply(params, ids, cfg)
        assert np.allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4) == (k == 4)  # every slice: dense
        report = json.loads((out / "report.json").read_text())
        assert (abs(report["val_loss"] - report["dense_val_loss"]) < 1e-4) == (k == 4)
        assert report["active_params"] < report["total_params"] or k == 4
    capsys.readouterr()
    for argv, message in ((["--partition", "5"], "--partition 5 must divide the model's FFN width d_ff=48"),
                          (["--partition", "4", "--top-k", "5"], "--top-k 5 must be an integer in [1, 4]"),
                          (["--partition", "4", "--upcycle", "2"], "--partition cannot be combined with --upcycle")):
        assert main(["moe-build", str(jmoe_dense_run), str(tmp_path / "bad"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()
    assert main(["moe-build", str(full), str(tmp_path / "bad"), "--partition", "2"]) == 2
    assert "is not a dense model" in capsys.readouterr().err


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


BAD = [
    (dict(bogus=1), "unknown key(s) bogus"),
    (dict(gate_mode="sideways"), "gate_mode 'sideways'"),
    (dict(experts_per_token=5), "experts_per_token=5 must be an integer in [1, 2]"),
    (dict(architecture="switch"), "architecture 'switch'"),
    (dict(architecture="qwen3_moe"), "is not built from a jmoe base"),
    (dict(experts=[{"source_model": "RUN"}, {"source_model": "RUN", "positive_prompts": ["x"]}]),
     "experts[0] needs positive_prompts"),
    (dict(experts=[{"source_model": "nowhere", "positive_prompts": ["x"]}]), "experts[0].source_model 'nowhere'"),
    (dict(experts=[{"source_model": "RUN", "positive_prompts": ["x"], "noise_scale": -1}]),
     "experts[0].noise_scale=-1"),
    (dict(experts=[{"source_model": "RUN", "positive_prompts": ["x"]}, {"source_model": "RUN", "positive_prompts": ["y"]}]),
     "identical experts only differ after training"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split()[0] for _, m in BAD])
def test_bad_configurations_are_one_line_and_write_nothing(jmoe_dense_run, tmp_path, capsys, change, message):
    top = dict(base_model=str(jmoe_dense_run), gate_mode="hidden",
               experts=[{"source_model": str(jmoe_dense_run), "positive_prompts": ["def"]},
                        {"source_model": str(jmoe_dense_run), "positive_prompts": ["the"]}])
    top.update(change)
    for e in top["experts"]:
        if e.get("source_model") == "RUN":
            e["source_model"] = str(jmoe_dense_run)
    out = tmp_path / "out"
    flags = [] if "identical" in message else ["--allow-identical"]
    assert main(["moe-build", str(write_config(tmp_path, **top)), str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_an_moe_base_and_broken_yaml_are_refused(tmp_path, capsys):
    (tmp_path / "bad.yml").write_text("experts: [unclosed\n")
    assert main(["moe-build", str(tmp_path / "bad.yml"), str(tmp_path / "out")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not exist"):
        parse_build_config(tmp_path / "none.yml")


def test_upcycling_a_hugging_face_llama_gives_a_mixtral_that_computes_it(llamas, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")

    out = tmp_path / "up"
    assert main(["moe-build", str(llamas["base"]), str(out), "--upcycle", "4", "--top-k", "2", "--quiet"]) == 0
    built = T.AutoModelForCausalLM.from_pretrained(out).eval()
    dense = T.AutoModelForCausalLM.from_pretrained(llamas["base"]).eval()
    assert type(built).__name__ == "MixtralForCausalLM" and built.config.num_local_experts == 4
    ids = torch.tensor(np.random.default_rng(2).integers(0, 280, (2, 12)))
    with torch.no_grad():
        np.testing.assert_allclose(built(ids).logits.numpy(), dense(ids).logits.numpy(), rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    for argv, message in ((["--upcycle", "2", "--top-k", "3"], "--top-k 3 must be an integer in [1, 2]"),
                          (["--top-k", "2"], "--top-k goes with --upcycle")):
        assert main(["moe-build", str(llamas["base"]), str(tmp_path / "bad"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_models_that_disagree_in_shape_are_refused_before_any_work(llamas, tmp_path, capsys):
    T = pytest.importorskip("transformers")

    other = tmp_path / "wide"
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=280, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                       ).save_pretrained(other)
    cfg_path = write_config(tmp_path, base_model=str(llamas["base"]),
                            experts=experts(["code"], llamas) + [{"source_model": str(other), "positive_prompts": ["x"]}])
    capsys.readouterr()
    assert main(["moe-build", str(cfg_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "experts[1].source_model" in err and "d_ff" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ BAM: attention experts too


@pytest.fixture(scope="module")
def bam_llamas(tmp_path_factory):
    """A tiny Llama base and two 'fine-tunes' whose every weight moved, attention included."""
    return tiny_llamas(tmp_path_factory.mktemp("bam"), ["base", "code", "prose"], lambda n: True)


def test_bam_from_hugging_face_fine_tunes_is_a_run_with_their_attention_as_experts(bam_llamas, tmp_path, capsys):
    from jmoe.io import hf
    from jmoe.train import load_run

    cfg_path = write_config(tmp_path, base_model=str(bam_llamas["base"]), gate_mode="hidden",
                            attention_experts="full", non_expert_params="average",
                            experts=experts(["code", "prose"], bam_llamas))
    out = tmp_path / "bam"
    assert main(["moe-build", str(cfg_path), str(out), "--quiet"]) == 0
    cfg, _, params, _, _, _ = load_run(out)
    assert cfg.attention.experts == 2 and not cfg.attention.shared_kv and cfg.moe.num_experts == 2
    srcs = [hf.load(bam_llamas[n])[1] for n in ("code", "prose")]
    for layer in ("0", "1"):
        attn = params["layers"][layer]["attn"]
        for e, src in enumerate(srcs):
            for name in ("wq", "wk", "wv", "wo"):
                np.testing.assert_array_equal(attn[name][e], src["layers"][layer]["attn"][name])
        np.testing.assert_array_equal(attn["router"]["w"], params["layers"][layer]["moe"]["router"]["w"])
        np.testing.assert_allclose(params["layers"][layer]["attn_norm"]["scale"],
                                   np.mean([s["layers"][layer]["attn_norm"]["scale"] for s in srcs], axis=0), rtol=1e-6)
    np.testing.assert_allclose(params["embed"]["w"], np.mean([s["embed"]["w"] for s in srcs], axis=0), rtol=1e-6)
    # the run reads text with the base's tokenizer: generation, and training on top of it
    assert (out / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(out), "--prompt", "def f", "--max-new-tokens", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(row["token_ids"]) <= 3
    text = tmp_path / "text.txt"
    text.write_text("\n".join(TEXTS * 1000))
    assert main(["eval", "--ckpt", str(out), "--data", str(text), "--json", "--batches", "1"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["val_bpb"] < 0.9 * ev["val_loss"] / np.log(2)  # per text byte: several bytes per token
    tuned = tmp_path / "tuned"
    assert main(["train", "--out", str(tuned), "--resume-from", str(out), "--data", str(text), "--steps", "1",
                 "--eval-every", "1", "--ckpt-every", "1", "--batch-size", "2", "--seq-len", "16", "--quiet",
                 "--set", "train.eval_batches=1"]) == 0
    saved = json.loads((tuned / "config.json").read_text())
    assert saved["data"]["tokenizer"] and saved["data"]["bytes_per_token"] > 1


@pytest.mark.parametrize("mode", ["full", "shared_kv"])
def test_bam_of_copies_of_one_run_computes_it(jmoe_dense_run, tmp_path, mode):
    from jmoe.infer import values_per_token
    from jmoe.train import load_run

    base = str(jmoe_dense_run)
    cfg_path = write_config(tmp_path, base_model=base, gate_mode="random", experts_per_token=2,
                            attention_experts=mode, experts=[{"source_model": base}] * 3)
    out = tmp_path / "bam"
    assert main(["moe-build", str(cfg_path), str(out), "--quiet", "--allow-identical"]) == 0
    cfg, _, params, state, _, _ = load_run(out)
    dcfg, _, dparams, _, _, _ = load_run(jmoe_dense_run)
    assert cfg.attention.experts == 3 and cfg.attention.shared_kv == (mode == "shared_kv")
    assert values_per_token(cfg) == values_per_token(dcfg) * (1 if mode == "shared_kv" else 3)
    ids = np.random.default_rng(0).integers(0, 256, (2, 16))
    got, _ = jit_lm_apply(params, ids, cfg, state=state)
    want, _ = jit_lm_apply(dparams, ids, dcfg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change,message", [
    (dict(attention_experts="all"), "attention_experts 'all' is not one of full, shared_kv"),
    (dict(attention_experts="full", architecture="mixtral"), "set architecture to jmoe"),
    (dict(non_expert_params="mean"), "non_expert_params 'mean' is not one of base, average"),
])
def test_bad_bam_configurations_are_refused(jmoe_dense_run, tmp_path, capsys, change, message):
    base = str(jmoe_dense_run)
    cfg_path = write_config(tmp_path, base_model=base, gate_mode="random",
                            experts=[{"source_model": base}] * 2, **change)
    assert main(["moe-build", str(cfg_path), str(tmp_path / "out"), "--allow-identical"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
