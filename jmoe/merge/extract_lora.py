"""LoRA extraction (mergekit-extract-lora's job): the difference between a fine-tuned model and
its base, per weight matrix, as a rank-r LoRA by truncated SVD, written as a PEFT adapter
(`adapter_config.json` + `adapter_model.safetensors`) that `peft` loads onto the base.

Per tensor of the two Hugging Face directories (read lazily, one tensor at a time):
  2-D `*.weight` of an input embedding (`embed_tokens`)   lora_embedding_A [r, vocab],
                                                         lora_embedding_B [dim, r]
  other 2-D `*.weight` (linear layers, lm_head)           lora_A.weight [r, in], lora_B.weight [out, r]
  `*.weight` of other ranks (norms, fused experts)        saved whole (PEFT's modules_to_save),
                                                         or left out with skip_undecomposable
  anything else (biases, buffers)                         not in the adapter (counted in the report)
With delta = W_ft - W_base = U S V^T, A = sqrt(S_r) V_r^T and B = U_r sqrt(S_r) (sqrt(S) on
both sides, as mergekit does), r = min(rank, the matrix's smaller side); lora_alpha equals
the rank so PEFT's scale alpha / r is 1, with rank_pattern / alpha_pattern for matrices of
smaller rank. A fine-tune with more embedding rows than the base has them truncated (mergekit's
default). `apply_peft_lora` folds such an adapter back into base tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def low_rank(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [r, in], B [out, r]) with B @ A the best rank-r approximation of delta [out, in]."""
    u, s, vt = np.linalg.svd(np.asarray(delta, np.float32), full_matrices=False)
    r = min(rank, s.shape[0])
    root = np.sqrt(s[:r])
    return root[:, None] * vt[:r], u[:, :r] * root[None, :]


def kind_of(name: str, ndim: int) -> str:
    """'embedding', 'linear', 'to_save' (whole) or 'other' (not a module weight)."""
    if not name.endswith(".weight"):
        return "other"
    if ndim != 2:
        return "to_save"
    return "embedding" if name.endswith(EMBEDDING_SUFFIXES) else "linear"


def _shape(tensors: Mapping, name: str) -> tuple[int, ...]:
    """A tensor's shape without reading it (a lazy checkpoint), or of the array itself."""
    shape = getattr(tensors, "shape", None)
    return tuple(shape(name)) if callable(shape) else tuple(np.shape(tensors[name]))


def plan_extraction(finetuned: Mapping, base: Mapping) -> list[tuple[str, str]]:
    """[(tensor name, kind)] of the fine-tuned model's tensors; ValueError naming the first
    tensor the base lacks or whose shape differs (embedding rows may only grow)."""
    missing = [n for n in finetuned if n not in base]
    if missing:
        raise ValueError(f"the base model has no tensor {missing[0]!r} (the models differ in architecture)")
    plan = []
    for name in finetuned:
        fs, bs = _shape(finetuned, name), _shape(base, name)
        kind = kind_of(name, len(fs))
        grows = kind == "embedding" or name.endswith("lm_head.weight")
        if fs != bs and not (grows and len(fs) == 2 and fs[1] == bs[1] and fs[0] > bs[0]):
            raise ValueError(f"tensor {name!r} has shape {list(fs)} in the fine-tuned model and {list(bs)} in the base")
        plan.append((name, kind))
    return plan


def extract_lora(finetuned: Mapping, base: Mapping, *, rank: int = 32, skip_undecomposable: bool = False,
                 on_tensor: Callable[[str], None] | None = None) -> tuple[dict[str, np.ndarray], dict, dict]:
    """(adapter tensors {PEFT name: array}, PEFT adapter config, report) of the fine-tune
    against the base, both {name: array} (dicts, or lazy `jmoe.io.safetensors.Checkpoint`s read
    one tensor at a time). ValueError for rank < 1 or models that do not match."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} must be a positive integer")
    plan = plan_extraction(finetuned, base)
    tensors, ranks, saved, skipped, truncated = {}, {}, [], [], []
    for name, kind in plan:
        if on_tensor is not None:
            on_tensor(name)
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        prefix = f"base_model.model.{module}"
        if kind == "other" or (kind == "to_save" and skip_undecomposable):
            skipped.append(name)
            continue
        ft = np.asarray(finetuned[name], np.float32)
        if kind == "to_save":
            tensors[f"{prefix}.weight"] = np.asarray(finetuned[name])
            saved.append(module)
            continue
        b = np.asarray(base[name], np.float32)
        if ft.shape[0] > b.shape[0]:
            truncated.append(name)
            ft = ft[: b.shape[0]]
        if kind == "embedding":  # PEFT's embedding LoRA: delta = (B A)^T
            a, bb = low_rank((ft - b).T, rank)
            tensors[f"{prefix}.lora_embedding_A"], tensors[f"{prefix}.lora_embedding_B"] = a, bb
        else:
            a, bb = low_rank(ft - b, rank)
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, bb
        ranks[module] = a.shape[0]
    if not ranks:
        raise ValueError("the models have no weight matrices to extract a LoRA from")
    top = max(ranks.values())
    lower = {m: r for m, r in ranks.items() if r != top}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": top, "lora_alpha": top, "rank_pattern": lower,
        "alpha_pattern": lower, "target_modules": sorted({m.split(".")[-1] for m in ranks}),
        "modules_to_save": sorted({m.split(".")[-1] for m in saved}) or None, "bias": "none", "lora_dropout": 0.0,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "base_model_name_or_path": None,
    }
    report = {"rank": top, "matrices": len(ranks), "ranks_below": lower, "saved_whole": saved,
              "not_in_adapter": skipped, "rows_truncated": truncated,
              "adapter_params": int(sum(t.size for t in tensors.values()))}
    return tensors, config, report


def apply_peft_lora(base: Mapping[str, np.ndarray], tensors: Mapping[str, np.ndarray], config: dict) -> dict:
    """The base tensors with a PEFT LoRA adapter folded in: W + (alpha / r) B A per target
    matrix ((B A)^T for embeddings), modules_to_save replaced; float32."""
    out = {k: np.asarray(v, np.float32) for k, v in base.items()}
    for key, value in tensors.items():
        module = key.removeprefix("base_model.model.")
        for suffix in (".lora_A.weight", ".lora_embedding_A"):
            if module.endswith(suffix):
                m = module[: -len(suffix)]
                embedding = suffix == ".lora_embedding_A"
                b = tensors[f"base_model.model.{m}.{'lora_embedding_B' if embedding else 'lora_B.weight'}"]
                r = config.get("rank_pattern", {}).get(m, config["r"])
                alpha = config.get("alpha_pattern", {}).get(m, config["lora_alpha"])
                delta = (alpha / r) * (np.asarray(b, np.float32) @ np.asarray(value, np.float32))
                out[f"{m}.weight"] = out[f"{m}.weight"] + (delta.T if embedding else delta)
        if not (".lora_" in module):
            out[module] = np.asarray(value, np.float32)
    return out


def write_adapter(out: Path, tensors: dict, config: dict, report: dict, finetuned: Path, base: Path) -> None:
    """PEFT's files plus a model card into `out` (an existing, empty directory)."""
    from jmoe.io.safetensors import save_safetensors

    save_safetensors(tensors, out / ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps(dict(config, base_model_name_or_path=str(base)), indent=2))
    (out / "README.md").write_text(
        f"# LoRA extracted from {finetuned.name}\n\nA rank-{report['rank']} LoRA of the difference between "
        f"`{finetuned}` and its base `{base}`, made with `jmoe extract-lora` (truncated SVD of each weight "
        f"matrix's difference). Load it with `peft.PeftModel.from_pretrained(base_model, this_directory)`.\n\n"
        f"- weight matrices: {report['matrices']}\n- adapter parameters: {report['adapter_params']:,}\n"
        f"- saved whole: {', '.join(report['saved_whole']) or 'none'}\n")
