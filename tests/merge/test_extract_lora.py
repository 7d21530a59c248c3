"""`jmoe extract-lora FINETUNED BASE OUT`: a PEFT LoRA of the difference between two Hugging
Face directories, which folds back into the base as the fine-tune (exactly, when the change
is of low rank)."""

import json

import numpy as np
import pytest

from jmoe.cli import main
from jmoe.io import load_safetensors, save_safetensors
from jmoe.merge.extract_lora import apply_peft_lora, extract_lora

RNG = np.random.default_rng(0)
SHAPES = {"model.embed_tokens.weight": (12, 8), "model.layers.0.self_attn.q_proj.weight": (8, 8),
          "model.layers.0.mlp.up_proj.weight": (16, 8), "model.layers.0.mlp.down_proj.weight": (8, 16),
          "model.layers.0.input_layernorm.weight": (8,), "model.layers.0.self_attn.q_proj.bias": (8,),
          "model.layers.0.mlp.gate.weight": (2, 8), "lm_head.weight": (12, 8)}


def low_rank_change(shape, rank):
    if len(shape) == 1:
        return 0.1 * RNG.standard_normal(shape)
    return 0.1 * RNG.standard_normal((shape[0], rank)) @ RNG.standard_normal((rank, shape[1]))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = {n: RNG.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    ft = {n: (v + low_rank_change(v.shape, 3)).astype(np.float32) for n, v in base.items()}
    for name, tree in (("base", base), ("ft", ft)):
        save_safetensors(tree, root / name)
    return root, base, ft


def test_the_adapter_folds_back_into_the_fine_tune(dirs, tmp_path, capsys):
    root, base, ft = dirs
    out = tmp_path / "lora"
    assert main(["extract-lora", str(root / "ft"), str(root / "base"), str(out), "--rank", "4", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "q_proj.bias" in err and len(err.strip().splitlines()) == 1  # the bias is not a module weight
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_safetensors(out / "adapter_model.safetensors", lazy=False)
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert config["rank_pattern"] == {"model.layers.0.mlp.gate": 2}  # a 2 x 8 matrix has rank 2 at most
    assert set(config["target_modules"]) == {"embed_tokens", "q_proj", "up_proj", "down_proj", "gate", "lm_head"}
    assert config["modules_to_save"] == ["input_layernorm"]
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 12)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (8, 4)
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape == (4, 8)
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (16, 4)
    folded = apply_peft_lora(base, tensors, config)
    for name in SHAPES:
        want = base[name] if name.endswith("bias") else ft[name]
        np.testing.assert_allclose(folded[name], want, rtol=1e-4, atol=1e-5, err_msg=name)
    assert (out / "README.md").exists() and not list(tmp_path.glob("lora.tmp-*"))


def test_a_lower_rank_is_the_best_approximation_of_that_rank(dirs):
    _, base, ft = dirs
    tensors, config, report = extract_lora(ft, base, rank=1, skip_undecomposable=True)
    assert report["saved_whole"] == [] and "model.layers.0.input_layernorm.weight" in report["not_in_adapter"]
    folded = apply_peft_lora(base, tensors, config)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        s = np.linalg.svd(ft[name].astype(np.float64) - base[name], compute_uv=False)
        err = np.linalg.norm(folded[name] - ft[name])
        np.testing.assert_allclose(err, np.sqrt(np.sum(s[1:] ** 2)), rtol=1e-3)  # Eckart-Young


def test_extra_embedding_rows_are_truncated(dirs, tmp_path, capsys):
    root, base, ft = dirs
    grown = dict(ft, **{"model.embed_tokens.weight": np.concatenate([ft["model.embed_tokens.weight"],
                                                                    np.ones((3, 8), np.float32)])})
    save_safetensors(grown, tmp_path / "grown")
    assert main(["extract-lora", str(tmp_path / "grown"), str(root / "base"), str(tmp_path / "o"), "--quiet"]) == 0
    assert "extra rows of model.embed_tokens.weight" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("rank", "--rank 0 must be at least 1"),
    ("missing", "is not a directory"),
    ("shape", "has shape [8, 9] in the fine-tuned model"),
    ("names", "the base model has no tensor 'extra.weight'"),
])
def test_bad_input_is_one_line_and_writes_nothing(dirs, tmp_path, capsys, case, message):
    root, base, ft = dirs
    finetuned = root / "ft"
    if case in ("shape", "names"):
        changed = dict(ft)
        if case == "shape":
            changed["model.layers.0.self_attn.q_proj.weight"] = np.zeros((8, 9), np.float32)
        else:
            changed["extra.weight"] = np.zeros((2, 2), np.float32)
        finetuned = tmp_path / "changed"
        save_safetensors(changed, finetuned)
    args = ["extract-lora", str(finetuned if case != "missing" else tmp_path / "nowhere"), str(root / "base"),
            str(tmp_path / "out"), "--quiet"] + (["--rank", "0"] if case == "rank" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
