"""Hugging Face checkpoints in and out, driven by the tables of `architectures`.

`load` reads config.json and the safetensors (one file or shards with an index), builds the
`LMConfig`, and converts tensor by tensor (experts are stacked on the expert axis as they
are read); `iter_params` yields the same conversion one jmoe leaf at a time, so `convert` can
stream a checkpoint larger than memory to disk. `save` writes the Hugging Face layout back
(config.json from the config the model came from, updated with the jmoe config, and the
tensors, experts split again), which `transformers` loads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from jmoe.io.hf.architectures import ALIASES, ARCHITECTURES, architecture_of, conditions
from jmoe.io.safetensors import Checkpoint, ShardedWriter
from jmoe.nn.transformer import LMConfig, init_lm


@dataclasses.dataclass(frozen=True)
class Item:
    """One jmoe leaf: its path, the Hugging Face tensors it is made of, and the transform."""

    path: str
    hf_names: tuple[str, ...]
    transform: str


def plan(cfg: LMConfig, arch: str) -> list[Item]:
    """The `Item`s of a model with config `cfg` and architecture `arch`: the leaves outside the
    layers first, then layer by layer (an experts leaf lists one Hugging Face name per expert)."""
    rows = ARCHITECTURES[arch]["rows"]
    items = []
    top = conditions(cfg, None)
    for cond, hf, path, tf in rows:
        if "{i}" not in hf and cond in top:
            items.append(Item(path, (hf,), tf))
    for i in range(cfg.n_layers):
        on = conditions(cfg, i)
        for cond, hf, path, tf in rows:
            if "{i}" in hf and cond in on:
                if tf == "experts":
                    names = tuple(hf.format(i=i, e=e) for e in range(cfg.moe_for(i).num_experts))
                else:
                    names = (hf.format(i=i),)
                items.append(Item(path.format(i=i), names, tf))
    return items


def _heads(cfg: LMConfig, tf: str) -> int:
    return {"n_heads": cfg.n_heads, "kv_heads": cfg.kv_heads}[tf.split(":")[1]]


def to_jmoe(arrays: list[np.ndarray], tf: str, cfg: LMConfig) -> np.ndarray:
    """One jmoe leaf from its Hugging Face tensors by transform `tf` (see `architectures`);
    "experts" stacks E [out, in] matrices into [E, in, out]."""
    if tf == "copy":
        return arrays[0]
    if tf == "T":
        return np.ascontiguousarray(arrays[0].T)
    if tf == "experts":
        return np.stack([a.T for a in arrays])
    h = _heads(cfg, tf)
    a = arrays[0]
    if tf.startswith("T_in"):
        return np.ascontiguousarray(a.T.reshape(a.shape[1], h, -1))
    if tf.startswith("T_out"):
        return np.ascontiguousarray(a.T.reshape(h, -1, a.shape[0]))
    if tf.startswith("bias"):
        return a.reshape(h, -1)
    raise ValueError(f"unknown transform {tf!r}")


def to_hf(leaf: np.ndarray, tf: str) -> list[np.ndarray]:
    """The inverse of `to_jmoe`: a jmoe leaf back to its Hugging Face tensors (E [out, in]
    matrices for "experts", one tensor otherwise)."""
    leaf = np.asarray(leaf)
    if tf == "copy":
        return [leaf]
    if tf == "T":
        return [np.ascontiguousarray(leaf.T)]
    if tf == "experts":
        return [np.ascontiguousarray(w.T) for w in leaf]
    if tf.startswith("T_in"):
        return [np.ascontiguousarray(leaf.reshape(leaf.shape[0], -1).T)]
    if tf.startswith("T_out"):
        return [np.ascontiguousarray(leaf.reshape(-1, leaf.shape[-1]).T)]
    if tf.startswith("bias"):
        return [leaf.reshape(-1)]
    raise ValueError(f"unknown transform {tf!r}")


def read_config(path: str | Path) -> tuple[str, LMConfig, dict]:
    """(architecture key, `LMConfig`, config dict) from a Hugging Face model directory's config.json."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json (not a Hugging Face model directory)")
    try:
        hf = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path / 'config.json'} is not a JSON object")
    arch = architecture_of(hf)
    cfg = ARCHITECTURES[arch]["config"](hf)
    return arch, cfg, hf


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: dict, path: str):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def iter_params(path: str | Path) -> tuple[LMConfig, Iterator[tuple[str, np.ndarray]]]:
    """(config, generator of (jmoe path, array)): one leaf in memory at a time."""
    arch, cfg, _ = read_config(path)
    ckpt = Checkpoint(path)
    items = plan(cfg, arch)
    missing = [n for it in items for n in it.hf_names if n not in ckpt]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{path} is missing {len(missing)} tensor(s) its {arch} config needs: {shown}")
    dtypes = {ckpt.dtype(n) for it in items for n in it.hf_names}
    if len(dtypes) == 1:
        cfg = cfg.replace(param_dtype=next(iter(dtypes)).name)
    expected = {k: v.shape for k, v in _flat_shapes(cfg).items()}

    def gen():
        for it in items:
            leaf = to_jmoe([ckpt[n] for n in it.hf_names], it.transform, cfg)
            if it.path in expected and tuple(leaf.shape) != tuple(expected[it.path]):
                raise ValueError(f"{it.hf_names[0]}: converted to {it.path} with shape {tuple(leaf.shape)}, but the "
                                 f"config implies {tuple(expected[it.path])}")
            yield it.path, leaf

    return cfg, gen()


def _flat_shapes(cfg: LMConfig) -> dict:
    shapes = jax.eval_shape(lambda: init_lm(jax.random.key(0), cfg))
    out = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        out["/".join(str(getattr(k, "key", k)) for k in p)] = leaf
    return out


def _place(leaf: np.ndarray, on_device: bool):
    return jax.device_put(leaf) if on_device else leaf


def load(path: str | Path, *, on_device: bool = True) -> tuple[LMConfig, dict]:
    """(model config, params) of a Hugging Face MoE checkpoint directory.

    With `on_device` (the default) every leaf is a `jax.Array` on the default device, moved
    there as it is converted, so jitted calls do not copy the weights again on every call.
    `on_device=False` keeps NumPy arrays in host memory (for tools that only rewrite tensors).
    """
    cfg, leaves = iter_params(path)
    params: dict[str, Any] = {}
    for p, leaf in leaves:
        _set(params, p, _place(leaf, on_device))
    return cfg, params


def load_model(path: str | Path):
    """A `jmoe.nn.TransformerLM` whose call maps input_ids [B, S] to (logits [B, S, V], aux)."""
    from jmoe.nn.transformer import TransformerLM

    cfg, params = load(path)
    return TransformerLM.from_params(cfg, params)


def save(path: str | Path, cfg: LMConfig, params: dict, *, max_shard_size: int | str = "5GB",
         architecture: str | None = None) -> list[Path]:
    """Write a Hugging Face directory (config.json + safetensors) that transformers loads.

    Merged models export as Hugging Face needs them: experts shared through an `expert_map`
    are written once per router output, and per-layer MoE configs must agree (a model pruned
    or router-merged to different expert counts per layer has no Hugging Face form).
    """
    if cfg.attention.experts:
        raise ValueError(f"this model has {cfg.attention.experts} attention experts per layer, which no Hugging Face "
                         "architecture holds; keep it as a jmoe run")
    cfg, params = _uniform_moe(cfg, params)
    meta = dict(cfg.meta)
    base = json.loads(meta["hf_config"]) if "hf_config" in meta else {}
    arch = architecture or (architecture_of(base) if base else None)
    if arch is None:
        raise ValueError("save needs an architecture: the config carries none (pass architecture=...)")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    back = spec["back"](cfg)
    for key, value in list(back.items()):  # keep aliases of the same setting consistent
        for alias in ALIASES.get(key, ()):
            if alias in base:
                back[alias] = value
    hf = {**base, **back, "architectures": [spec["class"]], "model_type": arch}
    hf.setdefault("torch_dtype", cfg.param_dtype)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out, max_shard_size=max_shard_size)
    for it in plan(cfg, arch):
        try:
            leaf = _get(params, it.path)
        except KeyError:
            raise ValueError(f"params have no leaf {it.path!r} (needed for {it.hf_names[0]})") from None
        for name, arr in zip(it.hf_names, to_hf(np.asarray(leaf), it.transform)):
            writer.add(name, arr)
    files = writer.close()
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return files + [out / "config.json"]


def _uniform_moe(cfg: LMConfig, params: dict) -> tuple[LMConfig, dict]:
    """cfg and params with expert maps expanded and per-layer MoE configs folded into `moe`."""
    if cfg.moe is None or not cfg.layer_moe:
        return cfg, params
    params = dict(params)
    params["layers"] = dict(params["layers"])
    configs = {}
    for i in cfg.moe_layers:
        moe = cfg.moe_for(i)
        if moe.expert_map:
            layer = params["layers"][str(i)]
            idx = np.asarray(moe.expert_map)
            experts = {n: np.asarray(v)[idx] for n, v in layer["moe"]["experts"].items()}
            params["layers"][str(i)] = {**layer, "moe": {**layer["moe"], "experts": experts}}
            moe = moe.replace(num_experts=len(idx), expert_map=None)
        configs[i] = moe
    distinct = set(configs.values())
    if len(distinct) > 1:
        sizes = ", ".join(f"layer {i}: {m.num_experts} experts, top-{m.top_k}" for i, m in configs.items())
        raise ValueError(f"a Hugging Face config has one MoE shape for all layers, but the layers differ ({sizes}); "
                         "merge with router='share' or to the same expert count in every layer")
    return cfg.replace(moe=distinct.pop(), layer_moe=()), params


def convert(path: str | Path, out: str | Path, *, max_shard_size: int | str = "2GB") -> Path:
    """Stream a Hugging Face checkpoint into jmoe's layout (safetensors named by jmoe path, plus
    jmoe_config.json) one leaf at a time: the checkpoint never has to fit in memory."""
    cfg, leaves = iter_params(path)
    out = Path(out)
    writer = ShardedWriter(out, max_shard_size=max_shard_size, metadata={"format": "jmoe"})
    for p, leaf in leaves:
        writer.add(p, leaf)
    writer.close()
    (out / "jmoe_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    return out


def load_converted(path: str | Path, *, on_device: bool = True) -> tuple[LMConfig, dict]:
    """Read what `convert` wrote (leaves placed as by `load`)."""
    path = Path(path)
    cfg = LMConfig.from_dict(json.loads((path / "jmoe_config.json").read_text()))
    ckpt = Checkpoint(path)
    params: dict = {}
    for name in ckpt:
        _set(params, name, _place(ckpt[name], on_device))
    return cfg, params
