"""Byte-level text corpora: the embedded Python-standard-library corpus, or the user's files.

The embedded corpus needs no download: it is the `.py` sources of the standard library of
the running Python (site-packages and test directories excluded), in sorted path order.
Each file is assigned to train or validation by a hash of its relative path, so the split
is fixed and does not depend on which other files exist. The content hash goes into the
run's metadata, so a resumed run can tell whether it is reading the same text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
SEPARATOR = b"\n\n"


class CorpusError(ValueError):
    """The corpus cannot be built (missing or empty input)."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """train/val: uint8 arrays of bytes (or int32 token ids, see `tokenize_corpus`); source:
    where it came from; sha256 of the text; bytes_per_token: text bytes per validation id (1
    for bytes), which turns a loss per id into bits per byte; tokenizer: what made the ids."""

    train: np.ndarray
    val: np.ndarray
    source: str
    sha256: str
    num_files: int
    bytes_per_token: float = 1.0
    tokenizer: str | None = None

    def metadata(self) -> dict:
        if self.tokenizer is None:
            sizes = {"train_bytes": int(self.train.size), "val_bytes": int(self.val.size)}
        else:
            sizes = {"tokenizer": self.tokenizer, "train_tokens": int(self.train.size), "val_tokens": int(self.val.size),
                     "bytes_per_token": self.bytes_per_token}
        return {"source": self.source, "sha256": self.sha256, "num_files": self.num_files, **sizes}


def _encode(tokenizer, data: np.ndarray, chunk_bytes: int = 1 << 20) -> np.ndarray:
    """The ids of the text `data` (bytes), encoded in pieces of about `chunk_bytes` that end
    at a line break (so that no word is cut), without special tokens."""
    raw = data.tobytes()
    pieces, start = [], 0
    while start < len(raw):
        end = raw.find(b"\n", start + chunk_bytes)
        end = len(raw) if end < 0 else end + 1
        pieces.append(raw[start:end].decode("utf-8", errors="replace"))
        start = end
    encoded = tokenizer.backend.encode_batch(pieces, add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids, np.int32) for e in encoded] or [np.zeros(0, np.int32)])


def tokenize_corpus(corpus: Corpus, tokenizer) -> Corpus:
    """`corpus` as the token ids of `tokenizer` (a `jmoe.infer.tokenizer.HFTokenizer`): int32
    train/val arrays, and bytes_per_token measured on the validation text."""
    if corpus.tokenizer is not None:
        raise CorpusError(f"the corpus {corpus.source} is already tokenized ({corpus.tokenizer})")
    train, val = _encode(tokenizer, corpus.train), _encode(tokenizer, corpus.val)
    return dataclasses.replace(corpus, train=train, val=val, bytes_per_token=corpus.val.size / max(1, val.size),
                               tokenizer=tokenizer.name)


def _is_val(rel_path: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(rel_path.encode()).digest()[:4], "little")
    return (h % 10_000) < val_fraction * 10_000


def walk_files(root: Path, suffixes: tuple[str, ...] | None, exclude: set[str]) -> list[Path]:
    """The files under root (sorted, depth first) ending in one of `suffixes` (None: any),
    skipping directories named in `exclude` or starting with a dot."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude and not d.startswith("."))
        for f in sorted(filenames):
            if suffixes is None or f.endswith(suffixes):
                files.append(Path(dirpath) / f)
    return files


def _assemble(root: Path, files: list[Path], source: str, val_fraction: float) -> Corpus:
    train_parts, val_parts = [], []
    digest = hashlib.sha256()
    used = 0
    for path in files:
        data = path.read_bytes()
        if not data or b"\x00" in data[:4096]:
            continue  # empty or binary
        rel = path.relative_to(root).as_posix() if path != root else path.name
        digest.update(rel.encode() + b"\0" + data + b"\0")
        (val_parts if _is_val(rel, val_fraction) else train_parts).append(data + SEPARATOR)
        used += 1
    if used == 0:
        raise CorpusError(f"no text files found in {source}")
    if not val_parts:  # a single file or a tiny directory: hold out the tail instead
        joined = b"".join(train_parts)
        cut = int(len(joined) * (1 - val_fraction))
        train_parts, val_parts = [joined[:cut]], [joined[cut:]]
    train = np.frombuffer(b"".join(train_parts), np.uint8)
    val = np.frombuffer(b"".join(val_parts), np.uint8)
    return Corpus(train=train, val=val, source=source, sha256=digest.hexdigest(), num_files=used)


def stdlib_root() -> Path:
    """Directory of this interpreter's Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(val_fraction: float = 0.05) -> Corpus:
    """The standard library's own `.py` sources, split ~95/5 by file."""
    root = stdlib_root()
    files = walk_files(root, (".py",), EXCLUDED_DIRS)
    return _assemble(root, files, f"stdlib:{root}", val_fraction)


def text_corpus(path: str | os.PathLike, val_fraction: float = 0.05) -> Corpus:
    """A user's text: one file, or every non-binary file under a directory (sorted)."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"data path {str(p)!r} does not exist")
    if p.is_file():
        return _assemble(p.parent, [p], str(p), val_fraction)
    files = walk_files(p, None, {"__pycache__", ".git"})
    if not files:
        raise CorpusError(f"data directory {str(p)!r} is empty")
    return _assemble(p, files, str(p), val_fraction)


def load_corpus(data: str | None = None, val_fraction: float = 0.05) -> Corpus:
    """`data=None` or "stdlib": the embedded corpus; "tasks:NAME=WEIGHT,..." a mixture of
    evaluation tasks (`jmoe.evals.mixture`); otherwise a file or directory path."""
    if data in (None, "stdlib"):
        return stdlib_corpus(val_fraction)
    if data.startswith("tasks:"):
        from jmoe.evals.mixture import task_corpus

        try:
            return task_corpus(data)
        except ValueError as e:
            raise CorpusError(str(e)) from None
    return text_corpus(data, val_fraction)
