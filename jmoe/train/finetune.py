"""Fine-tuning adapters on a frozen model: where the frozen model comes from, and how a
fine-tuning run's adapters join it.

A fine-tuning run (`TrainConfig.base_from`) trains `params["adapters"]` alone; its
checkpoints hold the adapters and their optimizer state, and the frozen model is read from
`base_from` (a jmoe run or a Hugging Face directory), which the run never writes. The text
it trains on is bytes for a jmoe model and the ids of the directory's tokenizer.json for a
Hugging Face one (`corpus_for`). When it
finishes, the adapters are also written on their own, `adapters.safetensors` in the run
directory (one tensor per adapter leaf, named by its path).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jmoe.nn.transformer import LMConfig, lm_state_from_params
from jmoe.train.errors import TrainError

ADAPTERS_FILE = "adapters.safetensors"


def base_config(source: str | Path) -> LMConfig:
    """The model config of a frozen model `source` (a run or a Hugging Face directory), read
    without loading it. TrainError when it is neither, or is itself a fine-tuning run."""
    from jmoe.train import rundir

    path = Path(source)
    if rundir.is_run_dir(path):
        saved, _ = rundir.find_checkpoint(path)
        if saved.get("train", {}).get("base_from"):
            raise TrainError(f"{path} is itself a fine-tuning run; fine-tune its source {saved['train']['base_from']} "
                             "or a merged model")
        if "quantization" in saved:
            raise TrainError(f"{path} has quantized experts; fine-tune its float source run")
        return LMConfig.from_dict(saved["model"])
    if (path / "config.json").is_file():
        from jmoe.io import hf

        try:
            return hf.read_config(path)[1]
        except (ValueError, KeyError) as e:
            raise TrainError(f"{path}: {e}") from None
    what = "is not a directory" if not path.is_dir() else "is neither a jmoe run nor a Hugging Face model directory"
    raise TrainError(f"the model to fine-tune, {path}, {what}")


def base_tokenizer(source: str | Path):
    """The tokenizer of the model `source` (`rundir.tokenizer_dir`): None for byte-level
    runs (bytes are their ids), else the `HFTokenizer` of its tokenizer.json. TrainError
    when a Hugging Face directory has none: its ids cannot be made from text without it."""
    from jmoe.train import rundir

    path = Path(source)
    found = rundir.tokenizer_dir(path)
    if found is None and rundir.is_run_dir(path):
        return None
    from jmoe.infer.tokenizer import load_tokenizer

    try:
        return load_tokenizer(found or path)
    except ValueError as e:
        raise TrainError(f"fine-tuning text for {path} is encoded with its tokenizer: {e}") from None


def corpus_for(corpus, base_from: str | None):
    """`corpus` as the ids the model of a run reads: unchanged for byte-level models, encoded
    with the tokenizer of the model it starts from (`base_from` or `init_from`) when that
    model has one."""
    from jmoe.data import tokenize_corpus

    tokenizer = base_tokenizer(base_from) if base_from else None
    return corpus if tokenizer is None else tokenize_corpus(corpus, tokenizer)


def load_base(source: str | Path) -> tuple[LMConfig, dict]:
    """(config, {"params", "router_state"}) of the frozen model `source`, on the default device."""
    from jmoe.train import rundir

    path = Path(source)
    if rundir.is_run_dir(path):
        cfg, _, params, router_state, _, _ = rundir.load_run(path)
        return cfg, {"params": params, "router_state": router_state or {}}
    from jmoe.io import hf

    cfg, params = hf.load(path)
    return cfg, {"params": params, "router_state": lm_state_from_params(cfg, params)}


def check_base(model_cfg: LMConfig, source: str) -> None:
    """TrainError unless `model_cfg` is the model of `source` with adapters added."""
    if model_cfg.adapter is None:
        raise TrainError("fine-tuning from a frozen model needs adapters in the model config (LMConfig.adapter)")
    base = base_config(source)
    if base.replace(param_dtype=model_cfg.param_dtype) != model_cfg.replace(adapter=None):
        from jmoe.train.rundir import config_diff

        raise TrainError(f"the frozen model {source} differs from the run's model "
                         f"({config_diff(base, model_cfg.replace(adapter=None))})")


def join(base: dict, adapters: dict, adapter_state: dict | None) -> tuple[dict, dict]:
    """(params, router state) of the adapted model: the frozen model's with the adapters."""
    return {**base["params"], "adapters": adapters}, {**base.get("router_state", {}), **(adapter_state or {})}


def save_adapters(run_dir: str | Path, adapters: dict, adapter_state: dict | None = None) -> Path:
    """Write the adapters (and their non-gradient state) on their own: `adapters.safetensors`,
    one tensor per leaf named by its "."-joined path ("adapters.1.ffn.up.A",
    "state.adapter/1.up.bias")."""
    from jmoe.io.safetensors import save_safetensors

    tensors = {}
    for prefix, tree in (("adapters", adapters), ("state", adapter_state or {})):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            name = ".".join([prefix] + [str(getattr(k, "key", k)) for k in path])
            tensors[name] = np.asarray(leaf)
    out = Path(run_dir) / ADAPTERS_FILE
    save_safetensors(tensors, out, metadata={"format": "jmoe-adapters"})
    return out


def load_adapters(path: str | Path) -> tuple[dict, dict]:
    """(adapters, adapter state) from what `save_adapters` wrote."""
    from jmoe.io.safetensors import load_safetensors

    trees: dict = {"adapters": {}, "state": {}}
    for name, value in load_safetensors(path, lazy=False).items():
        prefix, *keys = name.split(".")
        node = trees[prefix]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return trees["adapters"], trees["state"]


def export_merged(run_dir: str | Path, out: str | Path, *, step: int | None = None, force: bool = False,
                  log=print) -> Path:
    """Fold the plain LoRA of the fine-tuning run `run_dir` into its frozen model and write the
    result to `out`: a Hugging Face directory (the base's architecture, with its tokenizer and
    generation files) when the frozen model is one, else a jmoe run. Checked before anything
    is loaded (ValueError, one line); written aside and moved into place at the end."""
    import shutil

    from jmoe.adapters import merge_lora
    from jmoe.merge.checkpoints import TOKENIZER_FILES
    from jmoe.merge.staging import check_output_dir, staged_dir
    from jmoe.train import rundir

    run = Path(run_dir)
    if not rundir.is_run_dir(run):
        raise ValueError(f"{run} is not a jmoe run directory")
    model_cfg, tc, _ = rundir.read_config(run)
    if not tc.base_from or model_cfg.adapter is None:
        raise ValueError(f"{run} is not a fine-tuning run (it has no adapters to merge)")
    if model_cfg.adapter.kind != "lora":
        raise ValueError(f"{run} trains {model_cfg.adapter.kind!r} adapters, which route per token; only plain LoRA "
                         "merges into the weights")
    out = check_output_dir(out, flag="--out", force=force, force_flag="--force")
    base = Path(tc.base_from)
    to_hf = not rundir.is_run_dir(base)
    cfg, tc, params, router_state, saved, at = rundir.load_run(run, step)
    log(f"merging the LoRA of {run} (step {at}) into {base}")
    merged = jax.tree.map(np.asarray, merge_lora(params, cfg))
    plain = cfg.replace(adapter=None)
    with staged_dir(out) as tmp:
        if to_hf:
            from jmoe.io import hf

            hf.save(tmp, plain, merged)
            for name in TOKENIZER_FILES + ("generation_config.json",):
                if (base / name).is_file():
                    shutil.copy(base / name, tmp / name)
        else:
            state = {k: v for k, v in (router_state or {}).items() if not k.startswith("adapter/")}
            rundir.save_model_run(tmp, plain, tc.replace(base_from=None), merged, state, at, saved.get("data", {}),
                                  meta={"merged_from": str(run.absolute())}, merged_from=str(run.absolute()))
    log(f"wrote {out} ({'Hugging Face directory' if to_hf else 'jmoe run'})")
    return out
