"""Output directories built aside and moved into place at the end.

`jmoe merge` and `jmoe compress` write their output into a temporary sibling of the output
directory (`<out>.tmp-<pid>`, next to it) and rename it into place only when everything has
been written. Any failure on the way (an exception, Ctrl-C) removes the sibling, and the
parent directories the command created for it, so that nothing is left on disk.

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
    """`out` as a Path; ValueError naming it when it is a file, or a non-empty directory and
    `force` is False. flag: how the error names the option that chose it; force_flag: the
    option that allows a non-empty directory, if the command has one."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; choose another {flag}")
    if out.is_dir() and not force and any(out.iterdir()):
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
    place (renamed to `out`, or, when `out` is a non-empty directory, its entries moved into
    `out`, replacing those of the same name). On any exception, KeyboardInterrupt included,
    remove it and the parent directories created for it, and re-raise."""
    out = Path(out).absolute()
    created = []
    p = out.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    tmp = staging_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by an earlier process with the same id
            shutil.rmtree(tmp)
        tmp.mkdir()
        yield tmp
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
        return
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    for entry in sorted(tmp.iterdir()):
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()
