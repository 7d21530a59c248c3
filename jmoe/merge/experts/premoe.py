"""PreMoe (JarvisPei/PreMoe): keep the experts a task needs, and find the task of a new prompt.

Task-conditioned expected selection scores (TCESS). Over the tokens of a few examples of a
task, every MoE layer's router marks each token's selected experts with a score; an expert's
TCESS is its mark averaged over all tokens (0 where it is not selected). The reference
(`collect_utils.py`) marks the top-1 expert (k = 1) with its raw router logit; its general
branch keeps the top-k experts whose probability among those k reaches a threshold r. jmoe
offers both, and by default marks with the router probability instead of the logit
(`score="prob"`): a raw logit can be negative, so an expert chosen often with negative logits
would rank below one never chosen, and a softmax router's logits are defined only up to a shift
per token.

Subsets. A task keeps the M experts of each layer with the largest TCESS (ties to the lower
index). The pruned layer is the model's own layer over the kept experts: router columns and
expert weights sliced, top-k unchanged, the router renormalising over the survivors (the
reference slices the gate the same way).

Retrieval (TAER). For a new prompt, the first MoE layer's marks averaged over the prompt's
tokens are matched by L2 distance against each stored task's first-layer TCESS; the nearest
task's subset is used (the reference stores those vectors in a FAISS flat L2 index).

`TaskExperts` holds the statistics of several tasks; `premoe_run` stores them with a copy of a
run (`jmoe compress --method premoe`), and `jmoe generate` / `jmoe evaluate` read them back.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.merge.experts.prune import _check_prunable_layer, prune_layer
from jmoe.nn.transformer import LMConfig, lm_apply

SCORES = ("prob", "logit")
FILE = "premoe.npz"


@partial(jax.jit, static_argnames=("cfg", "k", "score", "first_only"))
def _marks(params, tokens, valid, cfg, router_state, k, threshold, score, first_only):
    """Per MoE layer: the sum over valid tokens of each expert's mark [E]."""
    _, aux = lm_apply(params, tokens, cfg, state=router_state)
    out = []
    for i, a in zip(cfg.moe_layers, aux.moe):
        E = cfg.moe_for(i).num_experts
        logits = a.routing.logits[:, :E].astype(jnp.float32)
        top, idx = jax.lax.top_k(logits, k)
        keep = jax.nn.softmax(top, axis=-1) >= threshold
        value = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), idx, axis=-1) if score == "prob" else top
        marks = jnp.zeros_like(logits).at[jnp.arange(logits.shape[0])[:, None], idx].add(jnp.where(keep, value, 0.0))
        out.append(jnp.sum(marks * valid.reshape(-1, 1), axis=0))
        if first_only:
            break
    return out


def _check(cfg: LMConfig, k: int, threshold: float, score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"score={score!r} must be one of {', '.join(SCORES)}")
    if not cfg.moe_layers:
        raise ValueError("the model has no MoE layers")
    E = min(cfg.moe_for(i).num_experts for i in cfg.moe_layers)
    if not 1 <= k <= E:
        raise ValueError(f"k={k} must be in [1, {E}]")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must be in [0, 1]")


def task_scores(params: dict, cfg: LMConfig, sequences: Iterable[Sequence[int]], *, router_state=None, k: int = 1,
                threshold: float = 0.0, score: str = "prob", first_only: bool = False,
                batch_size: int = 16) -> list[np.ndarray]:
    """TCESS of every MoE layer ([E] per layer) over the tokens of `sequences` (token id lists,
    each cut to the model's context). first_only: the first MoE layer only (a query)."""
    _check(cfg, k, threshold, score)
    seqs = [list(s)[: cfg.max_seq_len] for s in sequences if len(s)]
    if not seqs:
        raise ValueError("task statistics need at least one non-empty sequence")
    S = max(len(s) for s in seqs)
    S = 1 << (S - 1).bit_length()  # a few padded lengths: one compile each
    sums, count = None, 0
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b: b + batch_size]
        tokens = np.zeros((batch_size, min(S, cfg.max_seq_len)), np.int32)
        valid = np.zeros(tokens.shape, np.float32)
        for r, s in enumerate(chunk):
            tokens[r, : len(s)], valid[r, : len(s)] = s, 1.0
        marks = _marks(params, jnp.asarray(tokens), jnp.asarray(valid), cfg, router_state, k, threshold, score,
                       first_only)
        marks = [np.asarray(m, np.float64) for m in marks]
        sums = marks if sums is None else [a + m for a, m in zip(sums, marks)]
        count += int(valid.sum())
    return [s / count for s in sums]


@dataclasses.dataclass
class TaskExperts:
    """Stored PreMoe statistics: `scores[t]` is task `tasks[t]`'s TCESS per MoE layer
    ([T, L, E], layers `layers`), and each task keeps `experts_per_layer` experts."""

    tasks: tuple[str, ...]
    layers: tuple[str, ...]
    scores: np.ndarray
    experts_per_layer: int
    k: int = 1
    threshold: float = 0.0
    score: str = "prob"

    def kept(self, task: str) -> dict[str, np.ndarray]:
        """{layer: the task's kept expert indices, ascending}."""
        t = self._index(task)
        out = {}
        for j, layer in enumerate(self.layers):
            s = self.scores[t, j]
            order = np.lexsort((np.arange(s.size), -s))  # largest first, ties to the lower index
            out[layer] = np.sort(order[: self.experts_per_layer])
        return out

    def retrieve(self, query: np.ndarray) -> str:
        """The stored task nearest (L2) to a first-MoE-layer query vector [E]."""
        d = np.linalg.norm(self.scores[:, 0, :] - np.asarray(query, np.float64)[None], axis=-1)
        return self.tasks[int(np.argmin(d))]

    def _index(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"no PreMoe statistics for task {task!r}; this model has {', '.join(self.tasks)}")
        return self.tasks.index(task)

    def save(self, path: str | Path) -> None:
        meta = {"tasks": list(self.tasks), "layers": list(self.layers), "experts_per_layer": self.experts_per_layer,
                "k": self.k, "threshold": self.threshold, "score": self.score}
        with open(path, "wb") as f:
            np.savez(f, scores=self.scores, meta=np.asarray(json.dumps(meta)))

    @classmethod
    def load(cls, path: str | Path) -> "TaskExperts":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta, scores = json.loads(str(data["meta"])), np.asarray(data["scores"], np.float64)
            out = cls(tuple(meta["tasks"]), tuple(meta["layers"]), scores, int(meta["experts_per_layer"]),
                      int(meta["k"]), float(meta["threshold"]), str(meta["score"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not PreMoe statistics ({type(e).__name__}: {e})") from None
        if out.scores.shape[:2] != (len(out.tasks), len(out.layers)):
            raise ValueError(f"{path}: scores of shape {out.scores.shape} do not match {len(out.tasks)} tasks and "
                             f"{len(out.layers)} layers")
        return out


def prune_to(params: dict, cfg: LMConfig, kept: dict[str, np.ndarray]) -> tuple[dict, LMConfig]:
    """The model with only the `kept` experts of each MoE layer ({layer: indices})."""
    new = {**params, "layers": dict(params["layers"])}
    overrides = dict(cfg.layer_moe)
    for layer, keep in kept.items():
        moe_params, moe_cfg = prune_layer(params["layers"][layer]["moe"], cfg.moe_for(int(layer)), keep)
        new["layers"][layer] = {**params["layers"][layer], "moe": jax.tree.map(jnp.asarray, moe_params)}
        overrides[int(layer)] = moe_cfg
    return new, cfg.replace(layer_moe=tuple(sorted(overrides.items())))


def prune_router_state(state: dict | None, kept: dict[str, np.ndarray]) -> dict:
    """Router state (e.g. a selection bias [E]) restricted to the kept experts."""
    out = dict(state or {})
    for layer, keep in kept.items():
        if layer in out:
            out[layer] = {k: (np.asarray(v)[keep] if np.ndim(v) == 1 else v) for k, v in out[layer].items()}
    return out


def calibration_sequences(task, tokenizer, n: int, seed: int = 0, *, max_len: int = 256) -> list[list[int]]:
    """A task's calibration text as token sequences: n training examples (prompt and answer),
    or windows of a text domain's training text."""
    if task.kind == "exact_match":
        return [tokenizer.encode(ex.line) for ex in task.examples("train", n, seed)]
    ids = tokenizer.encode(task.text("train").decode())
    return [ids[i: i + max_len] for i in range(0, min(len(ids), n * max_len), max_len)]


def query_sequences(task, tokenizer, split: str, n: int = 16, seed: int = 0, *, max_len: int = 256) -> list[list[int]]:
    """What retrieval sees of a task at evaluation: the prompts (questions only) of n examples
    of `split`, or n windows of a text domain's `split` text."""
    if task.kind == "exact_match":
        return [tokenizer.encode(ex.prompt)[:max_len] for ex in task.examples(split, n, seed)]
    ids = tokenizer.encode(task.text(split).decode())
    return [ids[i: i + max_len] for i in range(0, min(len(ids), n * max_len), max_len)]


def check_subset_request(cfg: LMConfig, experts_per_layer: int, source: str = "the model") -> None:
    """ValueError unless every MoE layer can keep `experts_per_layer` experts."""
    if cfg.moe is None or not cfg.moe_layers:
        raise ValueError(f"{source} is a dense model: there are no experts to select")
    for i in cfg.moe_layers:
        moe = cfg.moe_for(i)
        _check_prunable_layer(moe, f" (layer {i} of {source})")
        if not moe.top_k <= experts_per_layer <= moe.num_experts:
            raise ValueError(f"--experts-per-layer {experts_per_layer} must be in [top-k = {moe.top_k}, "
                             f"{moe.num_experts}] (layer {i} of {source})")


def premoe_run(ckpt: str | Path, out: str | Path, *, experts_per_layer: int, tasks: str, examples: int = 64,
               k: int = 1, threshold: float = 0.0, score: str = "prob", step: int | None = None, seed: int = 0,
               log: Callable[[str], None] = print) -> dict:
    """Collect PreMoe statistics of `tasks` (evaluation-suite names) on the run in `ckpt` and
    write a copy of the run with them to `out` (its config.json gains a `premoe` entry, and
    premoe.npz holds the statistics). Checked before any work; written in a temporary sibling
    of `out`, renamed at the end. Returns the report (also out/report.json)."""
    import shutil
    import time

    from jmoe import evals
    from jmoe.infer.tokenizer import load_tokenizer
    from jmoe.merge.staging import check_output_dir, staged_dir
    from jmoe.train import rundir

    t0 = time.perf_counter()
    saved, chosen = rundir.find_checkpoint(ckpt, step)
    if "quantization" in saved:
        raise ValueError(f"{ckpt} has quantized experts; select experts of its source run, then quantize")
    cfg = LMConfig.from_dict(saved["model"])
    check_subset_request(cfg, experts_per_layer, str(ckpt))
    _check(cfg, k, threshold, score)
    task_list = evals.resolve_tasks(tasks)
    if not isinstance(examples, int) or examples < 1:
        raise ValueError(f"examples={examples!r} must be an integer >= 1")
    out = check_output_dir(out)

    cfg, tc, params, router_state, saved, chosen = rundir.load_run(ckpt, chosen)
    tok = load_tokenizer(None, vocab_size=cfg.vocab_size)
    layers = tuple(str(i) for i in cfg.moe_layers)
    scores = []
    for task in task_list:
        log(f"task statistics: {task.name}")
        seqs = calibration_sequences(task, tok, examples, seed, max_len=cfg.max_seq_len)
        scores.append(np.stack(task_scores(params, cfg, seqs, router_state=router_state, k=k, threshold=threshold,
                                           score=score)))
    stats = TaskExperts(tuple(t.name for t in task_list), layers, np.stack(scores), experts_per_layer, k, threshold,
                        score)
    kept = {t: {l: v.tolist() for l, v in stats.kept(t).items()} for t in stats.tasks}
    report = {"source": str(Path(ckpt).absolute()), "step": chosen, "method": "premoe",
              "experts_per_layer": experts_per_layer, "tasks": list(stats.tasks), "examples": examples, "k": k,
              "threshold": threshold, "score": score, "kept": kept}
    with staged_dir(out) as tmp:
        shutil.copytree(Path(ckpt) / rundir.CHECKPOINTS / str(chosen), tmp / rundir.CHECKPOINTS / str(chosen))
        stats.save(tmp / FILE)
        extra = {k: v for k, v in saved.items() if k not in ("model", "train", "data", "jmoe_version")}
        rundir.write_config(tmp, cfg, tc, saved.get("data", {}), **extra,
                            premoe={"tasks": list(stats.tasks), "experts_per_layer": experts_per_layer,
                                    "source": report["source"]})
        report["wall_s"] = time.perf_counter() - t0
        rundir.write_report(tmp, report)
    log(f"{len(stats.tasks)} task subsets of {experts_per_layer} experts per layer; wrote {out}")
    return report
