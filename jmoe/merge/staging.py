"""Output directories built aside and moved into place at the end.

Commands that write a new run (`jmoe merge`, `jmoe compress`, `jmoe quantize`, ...) write their
output into a temporary sibling of the output directory (`<out>.tmp-<pid>`, next to it) and
move it into place only when everything has been written, holding the output directory's run
lock all the while (one writer at a time, as for `jmoe train`). Any failure on the way (an
exception, Ctrl-C) removes the sibling, the lock and the directories the command created for
them, so that nothing is left on disk.

    check_output_dir(out)               # before any work: a one-line error if out is taken
    with staged_dir(out) as tmp:        # tmp: the directory to write into
        write(tmp)
    # here `out` holds what was written into tmp
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def check_output_dir(out: str | Path, *, flag: str = "--out", force: bool = False,
                     force_flag: str | None = None) -> Path:
    """`out` as a Path; ValueError naming it when it or a folder above it is a file, when
    another process writes it (holds its run lock), or when it is a non-empty directory and
    `force` is False. flag: how the error names the option that chose it; force_flag: the
    option that allows a non-empty directory, if the command has one."""
    from jmoe.train.rundir import LOCK, lock_holder

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; choose another {flag}")
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"{above} is not a directory, so {out} cannot be made; choose another {flag}")
    holder = lock_holder(out)
    if holder is not None:
        raise ValueError(f"{out} is being written by {holder}; wait for it to end or choose another {flag}")
    # a lock file nobody holds is what a killed writer left: it does not make the directory taken
    if out.is_dir() and not force and any(e.name != LOCK for e in out.iterdir()):
        also = f" or pass {force_flag}" if force_flag else ""
        raise ValueError(f"{out} is not empty; choose another {flag}{also}")
    return out


def staging_path(out: str | Path) -> Path:
    """The temporary sibling this process builds `out` in."""
    out = Path(out).absolute()
    return out.with_name(f"{out.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out` to write into; on normal exit move it into
    place (its entries moved into `out`, replacing those of the same name). `out` is locked
    for the whole time (`jmoe.train.rundir.lock`: one writer at a time; a second one gets a
    `RunLocked` error). On any exception, KeyboardInterrupt included, remove the sibling, the
    lock and the directories created for them, and re-raise."""
    from jmoe.train.rundir import lock

    out = Path(out).absolute()
    with lock(out):  # creates out and the folders above it; removes those it made on failure
        tmp = staging_path(out)
        try:
            if tmp.exists():  # left over by an earlier process with the same id
                shutil.rmtree(tmp)
            tmp.mkdir()
            yield tmp
            _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _move_into_place(tmp: Path, out: Path) -> None:
    for entry in sorted(tmp.iterdir()):
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()
