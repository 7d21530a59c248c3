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


def test_plain_lora_on_a_hugging_face_model_merges_into_a_directory_transformers_loads(tmp_path):
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    import jax.numpy as jnp

    from jmoe.adapters import merge_lora
    from jmoe.io import hf
    from tests.util import jit_lm_apply

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "llama")
    out = tmp_path / "ft"
    assert main(["finetune", "--ckpt", str(tmp_path / "llama"), "--out", str(out), "--adapter", "lora", "--rank", "4",
                 "--attn-targets", "wq,wk,wv,wo", "--lr", "1e-2", *FT]) == 0
    cfg, _, params, _, _, _ = load_run(out)
    merged = merge_lora(params, cfg)
    hf.save(tmp_path / "merged", cfg.replace(adapter=None), merged)
    ids = np.random.default_rng(0).integers(0, 256, (2, 10))
    theirs = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        want = theirs(torch.tensor(ids)).logits.numpy()
    got, _ = jit_lm_apply(params, jnp.asarray(ids), cfg)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
    with torch.no_grad():
        assert np.abs(model(torch.tensor(ids)).logits.numpy() - want).max() > 1e-3  # the LoRA changed the model
