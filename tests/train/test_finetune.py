"""`jmoe finetune`: adapters train on a frozen run, which stays bitwise unchanged; the run
resumes exactly, is read by eval and generate, and saves its adapters on their own."""

import hashlib
import json

import jax
import numpy as np
import pytest

from jmoe.cli import main
from jmoe.train import load_run, read_metrics
from jmoe.train.finetune import ADAPTERS_FILE, load_adapters

# a micro MoE model whose first layer is dense: dense FFN adapters and LoRA on routed experts
BASE = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2", "--set", "model.d_ff=64",
        "--set", "moe.num_experts=4", "--set", "moe.d_ff=32", "--set", "model.dense_layers=[0]",
        "--set", "moe.dropless.block_size=32", "--batch-size", "4", "--seq-len", "32",
        "--set", "train.eval_batches=2", "--set", "train.warmup_steps=2"]
FT = ["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-every", "4", "--ckpt-every", "2", "--quiet"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "base"
    assert main(["train", "--out", str(run), "--steps", "4", "--eval-every", "4", "--ckpt-every", "4", "--quiet", *BASE]) == 0
    return run


def digest(directory):
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(directory)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_only_the_adapters_train_and_the_run_is_read_like_any_other(base_run, tmp_path, capsys):
    before = digest(base_run)
    out = tmp_path / "ft"
    assert main(["finetune", "--ckpt", str(base_run), "--out", str(out), "--adapter", "mixlora", "--experts", "4",
                 "--top-k", "2", "--rank", "4", "--attn-targets", "wq,wv", *FT]) == 0
    assert digest(base_run) == before  # the frozen model's run is never written
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["base_from"] == str(base_run.absolute()) and saved["model"]["adapter"]["kind"] == "mixlora"

    cfg, _, params, _, _, step = load_run(out)
    _, _, base, _, _, _ = load_run(base_run)
    assert step == 4 and cfg.adapter.num_experts == 4
    frozen = {k: v for k, v in params.items() if k != "adapters"}
    jax.tree.map(np.testing.assert_array_equal, frozen, base)
    ad = params["adapters"]
    assert set(ad) == {"0", "1"} and set(ad["0"]) == {"ffn", "attn"} and set(ad["1"]) == {"experts", "attn"}
    assert ad["1"]["experts"]["w_up"]["A"].shape == (4, 32, 4)
    assert float(np.abs(ad["0"]["ffn"]["up"]["B"]).max()) > 0  # trained away from its zero init
    on_disk, _ = load_adapters(out / ADAPTERS_FILE)
    jax.tree.map(np.testing.assert_array_equal, on_disk, jax.tree.map(np.asarray, ad))

    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out), "--json", "--batches", "2"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["val_loss"])
    assert main(["generate", "--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "4", "--json", "--quiet"]) == 0
    assert len(json.loads(capsys.readouterr().out.splitlines()[0])["token_ids"]) == 4
    # MixLoRA routes per token: it has no merged form
    assert main(["merge-lora", "--ckpt", str(out), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "only plain LoRA merges" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "merged").exists()


def test_plain_lora_on_a_jmoe_run_merges_into_a_run(base_run, tmp_path, capsys):
    from tests.util import jit_lm_apply

    out, merged = tmp_path / "ft", tmp_path / "merged"
    assert main(["finetune", "--ckpt", str(base_run), "--out", str(out), "--adapter", "lora", "--rank", "4",
                 "--attn-targets", "wq,wo", "--lr", "1e-2", *FT]) == 0
    assert main(["merge-lora", "--ckpt", str(out), "--out", str(merged), "--quiet"]) == 0
    cfg, tc, params, state, _, step = load_run(merged)
    ft_cfg, _, ft_params, ft_state, _, _ = load_run(out)
    assert cfg.adapter is None and tc.base_from is None and "adapters" not in params and step == 4
    assert not any(k.startswith("adapter/") for k in state or {})
    ids = np.random.default_rng(0).integers(0, 256, (2, 16))
    got, _ = jit_lm_apply(params, ids, cfg, state=state)
    want, _ = jit_lm_apply(ft_params, ids, ft_cfg, state=ft_state)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert main(["merge-lora", "--ckpt", str(out), "--out", str(merged)]) == 2  # taken: refused, untouched
    assert "not empty" in capsys.readouterr().err


def test_an_interrupted_fine_tune_resumes_exactly(base_run, tmp_path):
    args = ["--adapter", "smora", "--rank", "8", "--top-k", "2", *FT]  # SMoRA: adapter state is carried too
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["finetune", "--ckpt", str(base_run), "--out", str(whole), *args]) == 0
    assert main(["finetune", "--ckpt", str(base_run), "--out", str(parts), "--stop-after", "2", *args]) == 0
    assert not (parts / ADAPTERS_FILE).exists()
    assert main(["finetune", "--ckpt", str(base_run), "--out", str(parts), "--resume", *args]) == 0
    losses = lambda run: [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert losses(parts) == losses(whole) and len(losses(whole)) == 4
    a, sa = load_adapters(whole / ADAPTERS_FILE)
    b, sb = load_adapters(parts / ADAPTERS_FILE)
    jax.tree.map(np.testing.assert_array_equal, (a, sa), (b, sb))
    assert set(sa) == {"adapter/0"} and np.any(sa["adapter/0"]["up"]["bias"] != 0)


@pytest.mark.parametrize("argv, message", [
    (["--layers", "5"], "AdapterConfig.layers has layer 5, but the model has 2 layers"),
    (["--adapter", "lora", "--rank", "40"], "rank=40 exceeds the width of layer 0's FFN"),
    (["--set", "adapter.bogus=1"], "has no option(s) bogus"),
    (["--attn-targets", "wz"], "attn_targets has 'wz'"),
    (["--adapter", "dynmole", "--top-k", "9", "--experts", "4"], "top_k=9 must be <= num_experts=4"),
    (["--adapter", "lora", "--top-k", "9", "--experts", "4"], "--adapter lora takes no --experts or --top-k"),
    (["--adapter", "smora", "--experts", "4"], "--adapter smora takes no --experts"),
    (["--layers", "0,0"], "names layer 0 twice"),
])
def test_bad_input_is_one_line_and_writes_nothing(base_run, tmp_path, capsys, argv, message):
    out = tmp_path / "ft"
    assert main(["finetune", "--ckpt", str(base_run), "--out", str(out), *argv, *FT]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_missing_model_is_refused(tmp_path, capsys):
    assert main(["finetune", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "ft"), *FT]) == 2
    assert "the model to fine-tune" in capsys.readouterr().err and not (tmp_path / "ft").exists()


def test_plain_lora_on_a_hugging_face_model_merges_into_a_directory_transformers_loads(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    import jax.numpy as jnp

    from jmoe.infer import load
    from tests.util import jit_lm_apply, write_bpe_tokenizer

    text = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 200
    (tmp_path / "data.txt").write_text(text)
    V = write_bpe_tokenizer(tmp_path / "llama", [text], vocab_size=300)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                             bos_token_id=0, eos_token_id=1))
    model.save_pretrained(tmp_path / "llama")
    out = tmp_path / "ft"
    assert main(["finetune", "--ckpt", str(tmp_path / "llama"), "--out", str(out), "--adapter", "lora", "--rank", "4",
                 "--attn-targets", "wq,wk,wv,wo", "--lr", "1e-2", "--data", str(tmp_path / "data.txt"), *FT]) == 0
    # the text was read as the ids of the model's own tokenizer, and bits per byte count text bytes
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["tokenizer"] == str(tmp_path / "llama") and data["bytes_per_token"] > 1.5
    ev = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert ev["val_bpb"] == pytest.approx(ev["val_loss"] / np.log(2) / data["bytes_per_token"])
    assert load(out).tokenizer.vocab_size == V  # generate and evaluate read the base's tokenizer
    cfg, _, params, _, _, _ = load_run(out)
    assert main(["merge-lora", "--ckpt", str(out), "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    assert (tmp_path / "merged" / "tokenizer.json").is_file()  # the merged directory is whole
    ids = np.random.default_rng(0).integers(0, V, (2, 10))
    theirs = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        want = theirs(torch.tensor(ids)).logits.numpy()
    got, _ = jit_lm_apply(params, jnp.asarray(ids), cfg)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
    with torch.no_grad():
        assert np.abs(model(torch.tensor(ids)).logits.numpy() - want).max() > 1e-3  # the LoRA changed the model
    # without its tokenizer a Hugging Face model's text has no ids: refused before anything is written
    (tmp_path / "llama" / "tokenizer.json").unlink()
    capsys.readouterr()
    assert main(["finetune", "--ckpt", str(tmp_path / "llama"), "--out", str(tmp_path / "ft2"), "--adapter", "lora",
                 "--data", str(tmp_path / "data.txt"), *FT]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "ft2").exists()
