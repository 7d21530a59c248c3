"""Checkpoints with orbax: periodic, keep-last-N, atomic (written aside, then renamed).

A step directory becomes visible only when complete, so a process killed mid-save leaves
the previous checkpoints intact and the next start resumes from the newest complete one.
Errors are `CheckpointError`s of one line that name the checkpoint, say what is wrong and
what to do; the text of orbax and TensorStore is cut to its first meaningful part.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model."""


class CheckpointStore:
    """`<run>/checkpoints/<step>/{state, meta}`: state is a pytree of arrays, meta a JSON dict.

    read_only: for readers of a run another process may be writing: nothing is saved,
    deleted or created.
    """

    def __init__(self, directory: str | Path, keep: int = 3, create: bool = True, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if (read_only or not create) and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints in {self.directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, create=create and not read_only, enable_async_checkpointing=False
        )
        self.read_only = read_only
        # A reader lists the steps while the run's writer may delete its oldest ones: a step
        # that vanishes between listing and reading is listed again.
        for attempt in range(20):
            try:
                self._manager = ocp.CheckpointManager(
                    self.directory, options=options,
                    item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
                )
                break
            except FileNotFoundError as e:
                if not read_only or attempt == 19:
                    raise CheckpointError(f"cannot list the checkpoints in {self.directory}: {e.strerror or e} "
                                          f"({e.filename})") from None

    def steps(self) -> list[int]:
        """The complete checkpoints' steps, oldest first (steps being written are not listed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened to read; it cannot save")
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore_meta(self, step: int) -> dict:
        _ignore_closed_loop_reports()
        try:
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for unreadable files
            raise CheckpointError(_damaged(self.directory / str(step), e)) from None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore onto the structure, shapes, dtypes (and shardings) of `abstract_state`.

        The shapes are compared first, from the checkpoint's metadata: a checkpoint of
        another model is an error naming the first parameter that differs.
        """
        where = self.directory / str(step)
        _ignore_closed_loop_reports()
        try:
            stored = self._manager.item_metadata(step)["state"]
        except Exception as e:
            raise CheckpointError(_damaged(where, e)) from None
        if stored is None or not _leaves(stored, "params"):
            raise CheckpointError(_damaged(where, ValueError("its state lists no parameters")))
        _check_shapes(stored, abstract_state, where)
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:
            raise CheckpointError(_damaged(where, e)) from None
        _check_matches(out["state"], abstract_state, where)
        return out["state"], out["meta"]

    def close(self) -> None:
        self._manager.close()


def _damaged(where: Path, e: BaseException) -> str:
    reason = _reason(e)
    if str(where) not in reason:
        file = _file_of(e, where)
        reason = f"{file}: {reason}" if file else reason
    return (f"checkpoint {where} is damaged ({reason}); restore it from a copy, or delete that step "
            "directory to fall back on the previous checkpoint")


# orbax wraps TensorStore's error in messages that end in dumps of its spec
_NOISE = (re.compile(r"\s*\[tensorstore_spec=.*", re.S), re.compile(r"\s*See full TensorStore details.*", re.S))
_STATUS = re.compile(r"^[A-Z_]+: ")
_OPENING = re.compile(r'Error opening "[\w-]+" driver: ')


def _reason(e: BaseException) -> str:
    """What is wrong, in one line: the innermost cause of `e` that says something, without
    TensorStore's status code, driver chain and spec dump."""
    for c in reversed(_chain(e)):
        text = str(c)
        for pattern in _NOISE:
            text = pattern.sub("", text)
        lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
        if not lines:
            continue
        text = _OPENING.sub("", _STATUS.sub("", lines[0])).rstrip(".:")
        if type(c) not in (Exception, ValueError, RuntimeError):
            text = f"{type(c).__name__}: {text}"
        return text[:400]
    return type(e).__name__


def _file_of(e: BaseException, where: Path) -> str | None:
    """The file under `where` that the innermost failing call of `e` was reading, if one of
    its frames names it (orbax's readers keep it in a local variable)."""
    for c in reversed(_chain(e)):
        frames = []
        tb = c.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for frame in reversed(frames):
            paths = [str(v) for v in frame.f_locals.values()
                     if isinstance(v, (str, os.PathLike)) and str(v).startswith(str(where) + os.sep)]
            if paths:
                return max(paths, key=len)  # the file rather than its directory
    return None


def _leaves(tree, top: str) -> dict[str, tuple]:
    """{"params/layers/0/...": shape} of the subtree `top` of a state or its metadata."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        if names and names[0] == top and hasattr(leaf, "shape"):
            out["/".join(names)] = tuple(leaf.shape)
    return out


def _check_shapes(stored, abstract, where: Path) -> None:
    """CheckpointError naming the first parameter whose shape (or presence) differs between
    the checkpoint's metadata `stored` and the model's `abstract` state."""
    for top in ("params", "router_state"):
        have, want = _leaves(stored, top), _leaves(abstract, top)
        for name in sorted(set(have) | set(want)):
            if name not in have:
                problem = f"has no {name} (the config expects shape {want[name]})"
            elif name not in want:
                problem = f"has {name} {have[name]}, which the config does not have"
            elif have[name] != want[name]:
                problem = f"has {name} of shape {have[name]}, the config expects {want[name]}"
            else:
                continue
            raise CheckpointError(
                f"the parameter shapes of checkpoint {where} do not match the run's config: it {problem}; "
                "the config (config.json) must be the one the checkpoint was trained with"
            )


def _check_matches(restored, abstract, where):
    ra, rt = jax.tree_util.tree_flatten_with_path(restored)
    aa, at = jax.tree_util.tree_flatten_with_path(abstract)
    if rt != at:
        raise CheckpointError(f"checkpoint {where} has a different tree than this model")
    for (path, r), (_, a) in zip(ra, aa):
        if tuple(r.shape) != tuple(a.shape):
            raise CheckpointError(
                f"checkpoint {where}: {jax.tree_util.keystr(path)} has shape {tuple(r.shape)}, "
                f"the model expects {tuple(a.shape)}"
            )


def _ignore_closed_loop_reports() -> None:
    """Drop the reports of the reads orbax leaves behind when a restore fails: TensorStore
    reads that finish after orbax closed its event loop ("Event loop is closed"), orbax's
    read coroutines that never finished (reported when collected) and their failed tasks
    (logged by asyncio when collected). They are harmless and come after the restore
    returned, so these filters (of `sys.unraisablehook` and the "asyncio" logger) stay for
    the life of the process; they pass every other report on."""
    hook = sys.unraisablehook
    if not getattr(hook, "_jmoe_drops_abandoned_reads", False):

        def filtered(report):
            exc = report.exc_value
            if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
                return
            code = getattr(report.object, "cr_code", None)  # a coroutine
            if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
                return
            hook(report)

        filtered._jmoe_drops_abandoned_reads = True
        sys.unraisablehook = filtered
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedOrbaxTasks) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedOrbaxTasks())


class _AbandonedOrbaxTasks(logging.Filter):
    """Drops asyncio's "<task or future> exception was never retrieved" of orbax's reads:
    those logged from orbax's code, or whose error comes from TensorStore (its errors carry
    a status code: "OUT_OF_RANGE: ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if "exception was never retrieved" not in msg.partition("\n")[0]:
            return True
        if f"{os.sep}orbax{os.sep}" in msg:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return not any(isinstance(c, ValueError) and _STATUS.match(str(c)) for c in _chain(exc))


def _chain(e: BaseException | None) -> list[BaseException]:
    """`e` and its causes, outermost first."""
    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return chain
