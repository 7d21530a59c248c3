"""The run directory: its format is written, read and checked here only.

A run directory holds:
  config.json      {"model": LMConfig.to_dict(), "train": TrainConfig.to_dict(), "data": the
                   corpus description (its content hash included), "jmoe_version", and, for
                   derived runs, where they came from (e.g. "compressed_from")}
  checkpoints/     orbax step directories (`CheckpointStore`): the train state
                   (`jmoe.train.state`) and a JSON meta dict
  metrics.jsonl    per-step training records and validation records (`MetricsLog`)
  training.png     loss curves and per-layer expert load over time
  summary.json     final numbers (written at the end of a run)
  report.json      what made a derived run (`jmoe compress`)
  .lock            while a process writes the run: that process's pid (see `lock`)

A run directory has one writer at a time: a writer takes `lock(run_dir)` before it writes
anything there. The lock is an OS lock (`flock`) that the kernel releases when the process
ends, however it ends, so it is never stale. Readers (`load_run`, `find_checkpoint`,
`checkpoint_steps`) do not take it: they read complete checkpoints only (orbax writes a step
aside and renames it into place when it is complete), and when the writer removes the one
`load_run` is reading (it keeps the newest N), `load_run` reads the newest one instead.

Every JSON file is replaced atomically (written aside, then renamed), and config.json is
written with `indent=1` and its keys in the order above, so the files of earlier runs read
the same.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import jax

import jmoe
from jmoe.nn.transformer import LMConfig
from jmoe.train.checkpoint import CheckpointError, CheckpointStore
from jmoe.train.config import TrainConfig
from jmoe.train.errors import TrainError
from jmoe.train.metrics import MetricsLog, atomic_write_text
from jmoe.train.state import abstract_train_state

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
PLOT = "training.png"
SUMMARY = "summary.json"
REPORT = "report.json"
LOCK = ".lock"

# Fields of TrainConfig a resumed run may change: they do not alter the trajectory so far.
RESUMABLE_CHANGES = frozenset({"steps", "eval_every", "eval_batches", "ckpt_every", "keep_ckpts", "log_every", "mesh"})


def run_config(model_cfg: LMConfig, tc: TrainConfig, data: dict, **extra) -> dict:
    """The contents of config.json: model, train, data, jmoe_version, then `extra` entries."""
    return {"model": model_cfg.to_dict(), "train": tc.to_dict(), "data": data, "jmoe_version": jmoe.__version__, **extra}


def write_config(run_dir: str | Path, model_cfg: LMConfig, tc: TrainConfig, data: dict, **extra) -> Path:
    """Write `run_dir`/config.json (see `run_config`); returns its path."""
    path = Path(run_dir) / CONFIG
    atomic_write_text(path, json.dumps(run_config(model_cfg, tc, data, **extra), indent=1))
    return path


def read_run_config(run_dir: str | Path) -> dict:
    """config.json of `run_dir` as a dict, checked to hold a readable model and train config.

    Raises TrainError (a ValueError) naming the file when it is missing or corrupt.
    """
    run = Path(run_dir)
    path = run / CONFIG
    if not path.is_file():
        raise TrainError(f"{run} is not a jmoe run directory ({path} is missing)")
    try:
        saved = json.loads(path.read_text())
        LMConfig.from_dict(saved["model"])
        TrainConfig.from_dict(saved["train"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TrainError(f"{path} is corrupt: {e}") from None
    return saved


def read_config(run_dir: str | Path) -> tuple[LMConfig, TrainConfig, dict]:
    """(model config, train config, data description) of the run in `run_dir`.

    Raises TrainError (a ValueError) naming config.json when it is missing or corrupt.
    """
    saved = read_run_config(run_dir)
    return LMConfig.from_dict(saved["model"]), TrainConfig.from_dict(saved["train"]), saved.get("data", {})


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` holds a run to resume or load: a config.json and a checkpoints folder."""
    path = Path(path)
    return (path / CONFIG).is_file() and (path / CHECKPOINTS).is_dir()


def tokenizer_dir(path: str | Path, _depth: int = 0) -> Path | None:
    """Where the tokenizer of the model directory `path` lies, or None for byte-level text.

    A directory with its own tokenizer.json (a Hugging Face model, or a run built from one
    by `jmoe moe-build`) is its own; a run trained on top of another model (`base_from` for
    adapters, `init_from` otherwise) reads that model's."""
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return path
    if _depth > 16 or not is_run_dir(path):
        return None
    train = read_run_config(path).get("train", {})
    source = train.get("base_from") or train.get("init_from")
    return tokenizer_dir(source, _depth + 1) if source else None


def in_use(path: str | Path) -> bool:
    """Whether `path` already holds (part of) a run, so that a new run must not be written there."""
    path = Path(path)
    return (path / CONFIG).exists() or (path / CHECKPOINTS).exists()


class RunLocked(TrainError):
    """Another process is writing the run directory."""


class RunLock:
    """The lock of the one process that writes a run directory (see `lock`)."""

    def __init__(self, path: Path, fd: int, created: list[Path], times: tuple[int, int] | None = None):
        self.path = path
        self.created = created  # the directories `lock` made for the run, deepest first
        self._times = times  # (atime, mtime) in ns of the run directory before `lock` made its lock file
        self._fd: int | None = fd

    def release(self, remove_created: bool = False) -> None:
        """Unlock and remove the lock file. remove_created (a run that failed before writing
        anything): also remove the directories `lock` made, if they are still empty, or give
        a directory that was there its times back."""
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still locked: no other process holds this file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        if remove_created:
            for d in self.created:
                try:
                    d.rmdir()
                except OSError:
                    break
            if self._times is not None:  # the run directory was there: as it was, its times too
                try:
                    os.utime(self.path.parent, ns=self._times)
                except OSError:
                    pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.release(remove_created=exc_type is not None)


def _holder(fd: int) -> str:
    """The writer named by a held lock file: "process <pid>" (the pid it wrote) or "another process"."""
    pid = os.read(fd, 32).decode(errors="replace").strip()
    return f"process {pid}" if pid.isdigit() else "another process"


def lock_holder(run_dir: str | Path) -> str | None:
    """Who writes `run_dir` ("process <pid>") while a process holds its lock, else None (no
    lock file, or one a killed writer left). Changes nothing on disk."""
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def lock(run_dir: str | Path) -> RunLock:
    """Become the one writer of `run_dir`, creating it (and its parents) if needed; release
    the returned `RunLock` when done. Nothing but the directory and its lock file is created.

    Raises RunLocked (a TrainError) naming the holder's pid when another process writes it,
    TrainError when `run_dir` is a file or cannot be locked.
    """
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise TrainError(f"{run} exists and is not a directory")
    created = []
    p = run.absolute()
    while not p.exists():
        created.append(p)
        p = p.parent
    path = run / LOCK
    times = None
    if not created and not path.exists():
        st = os.stat(run)
        times = (st.st_atime_ns, st.st_mtime_ns)
    try:
        run.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = _holder(fd)
                os.close(fd)
                raise RunLocked(f"{run} is being written by {who} (it holds {path}); wait for it to end "
                                "or choose another directory") from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder removes the file before unlocking it: a file locked after
            # its removal is no longer the run's lock file, so take the new one instead.
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException as e:
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):
            raise TrainError(f"cannot lock {path}: {e.strerror or e}") from None
        raise
    return RunLock(path, fd, created, times)


def checkpoint_store(run_dir: str | Path, keep: int = 3, create: bool = True, read_only: bool = False) -> CheckpointStore:
    """The `CheckpointStore` of `run_dir` (keeping the newest `keep` steps); close it after use.
    read_only: for readers, which never save, delete or create anything."""
    return CheckpointStore(Path(run_dir) / CHECKPOINTS, keep=keep, create=create, read_only=read_only)


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """The steps of the complete checkpoints of `run_dir`, oldest first ([] when none); reads only."""
    if not (Path(run_dir) / CHECKPOINTS).is_dir():
        return []
    store = checkpoint_store(run_dir, read_only=True)
    try:
        return store.steps()
    finally:
        store.close()


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> tuple[dict, int]:
    """(config.json of the run in `run_dir`, the step of its checkpoint `step`, default the
    newest complete one), checked without loading anything.

    Raises TrainError when `run_dir` is not a run or has no such checkpoint.
    """
    run = Path(run_dir)
    saved = read_run_config(run)
    if not (run / CHECKPOINTS).is_dir():
        raise TrainError(f"{run} has no checkpoints")
    steps = checkpoint_steps(run)
    if not steps:
        raise TrainError(f"{run} has no complete checkpoint")
    if step is None:
        return saved, steps[-1]
    if step not in steps:
        raise TrainError(f"{run} has no checkpoint at step {step} (have {', '.join(map(str, steps))})")
    return saved, step


def metrics_log(run_dir: str | Path) -> MetricsLog:
    """The `MetricsLog` of `run_dir` (metrics.jsonl)."""
    return MetricsLog(Path(run_dir) / METRICS)


def plot_path(run_dir: str | Path) -> Path:
    """Where the run's training plot goes (training.png)."""
    return Path(run_dir) / PLOT


def write_summary(run_dir: str | Path, summary: dict) -> Path:
    """Write `run_dir`/summary.json; returns its path."""
    return _write_json(Path(run_dir) / SUMMARY, summary)


def read_summary(run_dir: str | Path) -> dict | None:
    """summary.json of `run_dir`, or None while the run has not finished."""
    path = Path(run_dir) / SUMMARY
    return json.loads(path.read_text()) if path.exists() else None


def write_report(run_dir: str | Path, report: dict) -> Path:
    """Write `run_dir`/report.json; returns its path."""
    return _write_json(Path(run_dir) / REPORT, report)


def _write_json(path: Path, obj: Any) -> Path:
    atomic_write_text(path, json.dumps(obj, indent=1))
    return path


def check_resumable(saved: dict, model_cfg: LMConfig, tc: TrainConfig, data_sha256: str) -> None:
    """Raise TrainError unless a run saved with config.json `saved` may continue with
    (model_cfg, tc) on the corpus of hash `data_sha256`: the same model and corpus, and
    training settings that differ only in `RESUMABLE_CHANGES`."""
    if "quantization" in saved:
        raise TrainError("cannot resume: the run's experts are quantized (it is for inference); resume its "
                         f"source run {saved['quantization'].get('source', '')}".rstrip())
    saved_model = LMConfig.from_dict(saved["model"])
    if saved_model != model_cfg:
        raise TrainError(f"cannot resume: the model differs from the run's ({config_diff(saved_model, model_cfg)})")
    saved_train = saved["train"]
    changed = {k for k, v in tc.to_dict().items() if saved_train.get(k) != v} - RESUMABLE_CHANGES
    if changed:
        diffs = ", ".join(f"{k}: {saved_train.get(k)!r} -> {getattr(tc, k)!r}" for k in sorted(changed))
        raise TrainError(f"cannot resume: training settings differ from the run's ({diffs})")
    if saved.get("data", {}).get("sha256") != data_sha256:
        raise TrainError(
            f"cannot resume: the corpus differs from the run's (sha256 {saved['data'].get('sha256', '?')[:12]} "
            f"vs {data_sha256[:12]})"
        )


def config_diff(a: LMConfig, b: LMConfig) -> str:
    """The fields where two model configs differ, as "path: a -> b" items."""
    return _dict_diff(a.to_dict(), b.to_dict())


def _dict_diff(a: dict, b: dict, prefix="") -> str:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            sub = _dict_diff(va, vb, f"{prefix}{k}.")
            if sub:
                out.append(sub)
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return ", ".join(out)


def restore_state(run_dir: str | Path, step: int, abstract_state) -> tuple[dict, dict]:
    """(state, meta) of checkpoint `step` of `run_dir`, restored onto `abstract_state` (its
    structure, shapes, dtypes and shardings); reads only. Raises TrainError naming the
    checkpoint when it is damaged or of another model."""
    store = checkpoint_store(run_dir, read_only=True)
    try:
        return store.restore(step, abstract_state)
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    finally:
        store.close()


def load_run(run_dir: str | Path, step: int | None = None):
    """Restore a run's model (on one device) for evaluation or sampling.

    step: the checkpoint (default the newest complete one). A run that another process is
    writing reads safely: its newest complete checkpoint is restored.
    Returns (model_cfg, train_cfg, params, router_state, config.json dict, step); a run that
    fine-tunes adapters (`TrainConfig.base_from`) comes back joined with its frozen model.
    Raises TrainError when `run_dir` is not a run, has no such checkpoint, or it does not restore.
    """
    run = Path(run_dir)
    saved, chosen = find_checkpoint(run, step)
    model_cfg, tc = LMConfig.from_dict(saved["model"]), TrainConfig.from_dict(saved["train"])
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract_train_state(model_cfg, tc)
    )
    if "quantization" in saved:  # quantized experts, no optimizer state (`jmoe.quant.run`)
        from jmoe.quant.run import load_quantized

        params, router_state = load_quantized(run, chosen, model_cfg, saved["quantization"], abstract.get("router_state"))
        return model_cfg, tc, params, router_state, saved, chosen
    while True:
        try:
            state, _ = restore_state(run, chosen, abstract)
            break
        except TrainError:
            # the writer of a run keeps its newest N checkpoints: it may have removed this one
            # meanwhile, after saving newer ones
            if step is not None:
                raise
            _, newest = find_checkpoint(run)
            if newest <= chosen:
                raise
            chosen = newest
    params, router_state = state["params"], state.get("router_state")
    if tc.base_from:  # a fine-tuning run holds its adapters; the frozen model is read from its source
        from jmoe.train import finetune

        try:
            _, base = finetune.load_base(tc.base_from)
        except (TrainError, ValueError, OSError) as e:
            raise TrainError(f"{run} fine-tunes {tc.base_from}, which does not load: {e}") from None
        params, router_state = finetune.join(base, params, router_state)
    return model_cfg, tc, params, router_state, saved, chosen


def save_model_run(run_dir: str | Path, model_cfg: LMConfig, tc: TrainConfig, params: dict, router_state: dict | None,
                   step: int, data: dict, meta: dict | None = None, **extra) -> None:
    """Write a run directory that holds `params` (and router state) with a fresh optimizer at
    `step`: config.json (with the `extra` entries) and one checkpoint (with `meta`). Models
    made from other models (compressed, merged) are written this way, so that every command
    reads them as runs."""
    from jmoe.train.state import init_train_state, make_optimizer

    tx, _ = make_optimizer(tc)
    state = jax.jit(lambda: init_train_state(model_cfg, tc, tx))()
    state = dict(state, params=jax.tree.map(jax.numpy.asarray, params), opt_state=tx.init(params))
    if router_state:
        state["router_state"] = jax.tree.map(jax.numpy.asarray, router_state)
    store = checkpoint_store(run_dir, keep=1)
    try:
        store.save(step, state, {"step": step, "data_position": step, **(meta or {})})
    finally:
        store.close()
    write_config(run_dir, model_cfg, tc, data, **extra)
