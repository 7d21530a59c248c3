"""Fine-tuning adapters on a frozen model: where the frozen model comes from, and how a
fine-tuning run's adapters join it.

A fine-tuning run (`TrainConfig.base_from`) trains `params["adapters"]` alone; its
checkpoints hold the adapters and their optimizer state, and the frozen model is read from
`base_from` (a jmoe run or a Hugging Face directory), which the run never writes. When it
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
