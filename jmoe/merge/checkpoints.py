"""Out-of-core merging of safetensors checkpoints: tensor by tensor, bounded memory.

For every output tensor the engine reads that tensor from each input model (only its bytes:
at most one file of each model is open at a time, and nothing is memory-mapped), resolves
the method's parameters for it as its row of `jmoe.merge.MERGE_METHODS` says (per model, per
slice, global; layer gradients and filters apply), merges it with the same `jmoe.merge`
method the in-memory API uses, and streams it into the output shards. Memory holds a few
copies of one tensor, whatever the size of the models. Whole-model statistics (global TIES
thresholds) take extra streaming passes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.io.safetensors import INDEX, Checkpoint, ShardedWriter, parse_size
from jmoe.merge.mergekit import MergePlan, Slice, Source
from jmoe.merge.registry import REQUIRED, UNSET, MergeMethod, Param
from jmoe.merge.select import StreamingKth
from jmoe.merge.staging import staged_dir
from jmoe.merge.tree import LAYER, MergeError, layer_of, resolve_at
from jmoe.merge.vocab import Vocabulary, is_embedding
from jmoe.merge.vocab import build as build_vocabulary
from jmoe.progress import Progress

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
OUT_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def _rename_layer(name: str, new: int) -> str:
    m = LAYER.search(name)
    return name[: m.start(1)] + str(new) + name[m.end(1):]


def _with_layer(name: str, layer: int) -> str:
    return _rename_layer(name, layer) if layer_of(name) is not None else name


class _Task:
    """One output tensor: its name, position t, and (input name, Source, Slice) per input."""

    def __init__(self, out_name: str, t: float, inputs: list[tuple[str, Source, Slice]]):
        self.out_name = out_name
        self.t = t
        self.inputs = inputs


def plan_tensors(plan: MergePlan, ckpts: dict[Path, Checkpoint]) -> tuple[list[_Task], int]:
    """The output tensors and, for each, where its inputs come from. Returns (tasks, layers)."""
    ref_path = plan.base or (plan.slices[0].sources[0].model if plan.slices else plan.models[0].model)
    ref = ckpts[ref_path]
    names = list(ref)
    if plan.slices is None:
        sources = list(plan.models)
        if plan.base is not None and plan.spec.base and all(s.model != plan.base for s in sources):
            sources.append(Source(plan.base, None, {}))
        total = max((layer_of(n) for n in names if layer_of(n) is not None), default=-1) + 1
        whole = Slice(sources, {})
        tasks = []
        for n in names:
            layer = layer_of(n)
            t = (layer / (total - 1) if total > 1 else 1.0) if layer is not None else (0.0 if "embed" in n else 1.0)
            tasks.append(_Task(n, t, [(n, s, whole) for s in sources]))
        return tasks, total
    layer_names = [n for n in names if layer_of(n) is not None]
    template = sorted({_rename_layer(n, 0) for n in layer_names if layer_of(n) == min(layer_of(x) for x in layer_names)})
    tasks, out_layer = [], 0
    first, last = plan.slices[0], plan.slices[-1]
    for n in names:
        if layer_of(n) is None:
            owner = first if "embed" in n else last
            tasks.append(_Task(n, 0.0 if "embed" in n else 1.0, [(n, s, owner) for s in owner.sources]))
    for sl in plan.slices:
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for j in range(length):
            t = j / (length - 1) if length > 1 else 1.0
            for tmpl in template:
                inputs = [(_rename_layer(tmpl, s.layer_range[0] + j), s, sl) for s in sl.sources]
                tasks.append(_Task(_rename_layer(tmpl, out_layer), t, inputs))
            out_layer += 1
    return tasks, out_layer


def _param(name: str, source: Source, sl: Slice, plan: MergePlan, tensor: str, t: float, default=None):
    for scope in (source.params, sl.params, plan.params):
        if name in scope:
            v = resolve_at(scope[name], tensor, t, name)
            if v is not None:
                return v
    return default


def _convert(spec: MergeMethod, prm: Param, key: str, value, tensor: str):
    if prm.convert is None:
        return value
    try:
        return prm.convert(value)
    except MergeError:
        raise
    except (TypeError, ValueError) as e:
        raise MergeError(f"merge_method {spec.name!r}: {key}={value!r} at tensor {tensor!r} is not valid ({e})") from None


def _arguments(plan: MergePlan, task: _Task, idx: list[int], key, thresholds) -> dict:
    """The method's keyword arguments for one tensor, resolved from the configuration."""
    spec, tensor = plan.spec, task.out_name
    kwargs = {}
    for name, prm in spec.config_params.items():
        if prm.per_model:
            values = []
            for i in idx:
                v = _param(name, task.inputs[i][1], task.inputs[i][2], plan, tensor, task.t)
                if v is None and prm.when_absent is REQUIRED:
                    raise MergeError(f"{spec.name} needs parameter {name} (tensor {tensor})")
                values.append(prm.when_absent if v is None else _convert(spec, prm, name, v, tensor))
            kwargs[prm.name] = values
            continue
        v = _param(name, Source(Path("."), None, {}), task.inputs[0][2], plan, tensor, task.t)
        if v is not None:
            kwargs[prm.name] = _convert(spec, prm, name, v, tensor)
        elif prm.config_default is not UNSET:
            kwargs[prm.name] = prm.config_default
        elif prm.default is REQUIRED:
            raise MergeError(f"{spec.name} needs parameter {name} (tensor {tensor})")
    if "key" in spec.params:
        kwargs["key"] = key
    if thresholds is not None:
        kwargs["thresholds"] = thresholds
    return kwargs


def merge_tensor(plan: MergePlan, task: _Task, arrays: dict, base_array, key, thresholds=None) -> jax.Array:
    """Merge one tensor. arrays: {input index: array}; base_array: the base's (or None); key:
    the run's PRNG key (each tensor's own key derives from its name, as in the in-memory
    methods); thresholds: per-model global TIES thresholds (scope: global)."""
    spec = plan.spec
    name = task.out_name
    idx = [i for i, (_, src, _) in enumerate(task.inputs) if not (plan.base is not None and src.model == plan.base
                                                                  and spec.base)]
    wrap = lambda a: {name: jnp.asarray(a)}
    models = [wrap(arrays[i]) for i in idx]
    kwargs = _arguments(plan, task, idx, key, thresholds)
    if spec.base:
        base = wrap(base_array) if base_array is not None else None
        return spec(base, models, **kwargs)[name]
    return spec(models, **kwargs)[name]


def _global_thresholds(plan, tasks, ckpts, log) -> list:
    """Per non-base model: the magnitude of its k-th largest task-vector entry over the model."""
    sources = [s for s in (plan.models if plan.slices is None else plan.slices[0].sources) if s.model != plan.base]
    out = []
    for src in sources:
        density = _param("density", src, Slice([], {}), plan, "", 0.0, 1.0)
        if isinstance(density, (list, tuple)) or density is None:
            raise MergeError("global ties needs one density per model (no gradients)")
        density = float(density)
        if density >= 1:
            out.append(jnp.float32(0.0))
            continue
        kth = StreamingKth()

        def deltas():
            for task in tasks:
                for name, s, _ in task.inputs:
                    if s.model == src.model and np.issubdtype(ckpts[src.model].dtype(name), np.floating):
                        base_name = next(n for n, b, _ in task.inputs if b.model == plan.base)
                        yield np.abs(ckpts[src.model][name].astype(np.float32) - ckpts[plan.base][base_name].astype(np.float32))

        for d in deltas():
            kth.first_pass(d)
        kth.choose_high(max(1, int(density * kth.count)))
        for d in deltas():
            kth.second_pass(d)
        out.append(jnp.float32(kth.value()))
        log(f"global ties threshold for {src.model.name}: {out[-1]:.6g}")
    return out


def run_merge(plan: MergePlan, out_dir: str | Path, *, max_shard_size: int | str = "5GB", seed: int = 0,
              progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Merge the checkpoints of `plan` into `out_dir` (Hugging Face layout). Returns a summary.

    The output is built in a temporary sibling of `out_dir` and moved into place at the end
    (`jmoe.merge.staging`): a failure leaves nothing behind. Into an existing non-empty
    `out_dir`, the merged checkpoint replaces the one there (files of the same name, and
    stale shards and index), and other files stay.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MergeError(f"{out} exists and is not a directory")
    parse_size(max_shard_size)
    t0 = time.perf_counter()
    ckpts = {p: Checkpoint(p) for p in plan.model_dirs()}
    for p in ckpts:  # a broken config.json is named now, not after the merge
        _read_config(p)
    tasks, layers = plan_tensors(plan, ckpts)
    vocab = (build_vocabulary(plan.tokenizer_source, plan.base, plan.model_dirs(), plan.tokens, plan.pad_to_multiple_of)
             if plan.tokenizer_source else None)
    for task in tasks:  # every input must exist, with matching shapes (past the vocabulary's rows, when it is rebuilt)
        shapes = set()
        rows = vocab is not None and is_embedding(task.out_name)
        for name, src, _ in task.inputs:
            if name not in ckpts[src.model]:
                raise MergeError(f"{src.model}: tensor {name!r} is missing")
            shapes.add(ckpts[src.model].shape(name)[1:] if rows else ckpts[src.model].shape(name))
        if len(shapes) > 1:
            raise MergeError(f"tensor {task.out_name!r} has different shapes across models: {sorted(shapes)}")
    key = jax.random.key(seed)
    thresholds = None
    if "thresholds" in plan.spec.params and plan.params.get("scope") == "global":
        if plan.slices is not None:
            raise MergeError("global ties is not supported with slices")
        thresholds = _global_thresholds(plan, tasks, ckpts, log)
    with staged_dir(out) as tmp:
        files, bytes_read, layers = _write_merge(plan, tasks, ckpts, layers, tmp, key, thresholds, max_shard_size,
                                                 progress, t0, vocab)
    _remove_stale_shards(out, {f.name for f in files})
    seconds = time.perf_counter() - t0
    summary = {"tensors": len(tasks), "bytes_read": bytes_read, "seconds": seconds,
               "read_gb_per_s": bytes_read / 1e9 / seconds, "files": [f.name for f in files], "layers": layers}
    log(f"merged {len(tasks)} tensors ({bytes_read / 1e9:.2f} GB read) in {seconds:.1f} s into {out}")
    return summary


def _read_config(model: Path) -> dict | None:
    """The config.json of a model directory as a dict, None when it has none."""
    path = model / "config.json"
    if not path.exists():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise MergeError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _remove_stale_shards(out: Path, written: set[str]) -> None:
    """Remove safetensors files and the index of an earlier checkpoint in `out` that the merge
    did not write (they would be read as part of the new one)."""
    for f in [*out.glob("*.safetensors"), out / INDEX]:
        if f.name not in written and f.is_file():
            f.unlink()


def _write_merge(plan, tasks, ckpts, layers, out, key, thresholds, max_shard_size, progress, t0, vocab=None):
    """Merge every task into `out`; returns (files written, bytes read, layers). vocab: the
    output `Vocabulary` of tokenizer_source, whose rows the embedding tensors take first."""
    writer = ShardedWriter(out, max_shard_size=max_shard_size, metadata={"merged_by": "jmoe", "merge_method": plan.method})
    bar = Progress(len(tasks), enabled=progress, every=max(1, len(tasks) // 20))
    bytes_read = 0
    out_dtype = OUT_DTYPES.get(plan.out_dtype or plan.dtype or "")
    try:
        for n_done, task in enumerate(tasks, 1):
            arrays = {}
            base_array = None
            for i, (name, src, _) in enumerate(task.inputs):
                a = ckpts[src.model][name]
                bytes_read += a.nbytes
                if plan.base is not None and src.model == plan.base and plan.spec.base:
                    base_array = a
                else:
                    arrays[i] = a
            if plan.base is not None and plan.spec.base and base_array is None:
                base_array = ckpts[plan.base][task.inputs[0][0]]
                bytes_read += base_array.nbytes
            if vocab is not None and is_embedding(task.out_name):
                arrays, base_array = _on_vocabulary(vocab, task, arrays, base_array, plan.base)
            first = base_array if base_array is not None else next(iter(arrays.values()))
            if not np.issubdtype(first.dtype, np.floating):
                result = first
            else:
                result = merge_tensor(plan, task, arrays, base_array, key, thresholds)
                if out_dtype is not None:
                    result = jnp.asarray(result).astype(out_dtype)
            writer.add(task.out_name, np.asarray(result))
            elapsed = time.perf_counter() - t0
            bar.update(n_done, {"read": f"{bytes_read / 1e9:.2f} GB", "GB/s": f"{bytes_read / 1e9 / max(elapsed, 1e-9):.2f}"})
    finally:
        bar.close()
    files = writer.close()
    _copy_side_files(plan, out, layers, out_dtype, vocab)
    return files, bytes_read, layers


def _on_vocabulary(vocab: Vocabulary, task: _Task, arrays: dict, base_array, base: Path | None):
    """(arrays, base_array) of an embedding tensor with the rows of the output vocabulary."""
    by_model = {task.inputs[i][1].model: a for i, a in arrays.items()}
    if base_array is not None:
        by_model[base] = base_array
    moved = vocab.permute(by_model)
    return ({i: moved[task.inputs[i][1].model] for i in arrays},
            moved[base] if base_array is not None else None)


def _copy_side_files(plan: MergePlan, out: Path, layers: int, out_dtype, vocab: Vocabulary | None = None) -> None:
    ref = plan.base or (plan.slices[0].sources[0].model if plan.slices else plan.models[0].model)
    cfg = _read_config(ref)
    if cfg is not None:
        if plan.slices is not None and layers:
            for key in ("num_hidden_layers", "n_layer", "num_layers"):
                if key in cfg:
                    cfg[key] = layers
        if out_dtype is not None:
            cfg["torch_dtype"] = jnp.dtype(out_dtype).name
        if vocab is not None:
            cfg["vocab_size"] = vocab.size
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if (ref / "generation_config.json").exists():
        shutil.copy(ref / "generation_config.json", out / "generation_config.json")
    tok = plan.tokenizer_source
    tok_dir = ref if tok in (None, "base", "union") else Path(tok)
    # a rebuilt base or union vocabulary lives in tokenizer.json alone: the base's slow-tokenizer
    # files would load its old vocabulary
    slow = SLOW_TOKENIZER_FILES if tok in ("base", "union") else ()
    for f in TOKENIZER_FILES:
        if (tok_dir / f).exists() and f not in slow:
            shutil.copy(tok_dir / f, out / f)
    if vocab is not None:
        vocab.tokenizer.save(str(out / "tokenizer.json"))
    import yaml

    (out / "mergekit_config.yml").write_text(yaml.safe_dump(plan.raw, sort_keys=False))
