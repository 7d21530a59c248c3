"""Safetensors reading and writing in pure numpy: lazy, sharded, bounded memory.

The format: 8 bytes little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the
raw little-endian tensor bytes. Hugging Face checkpoints split across files carry a
`model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map": {name: file}}).

Reading is lazy: a `Checkpoint` knows every tensor's file, dtype and shape, and `[name]`
reads just that tensor's bytes into a fresh array (no memory map, so a process that reads a
checkpoint tensor by tensor holds only the tensors it keeps). Writing streams: a
`ShardedWriter` appends tensors to the current shard's data file and writes its header when
the shard is full, so memory stays at one tensor.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsError(ValueError):
    """A file is not valid safetensors, or a tensor is missing."""


def dtype_name(dtype) -> str:
    """The safetensors name ("F32", "BF16", ...) of a dtype (SafetensorsError if it has none)."""
    dt = np.dtype(dtype)
    if dt not in NAMES:
        raise SafetensorsError(f"dtype {dt} cannot be stored in safetensors")
    return NAMES[dt]


def parse_size(size: int | str) -> int:
    """500000, "500MB", "5GB", "1.5GiB" -> bytes."""
    if isinstance(size, (int, np.integer)):
        return int(size)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size like 5GB or 500MB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


class SafetensorsFile:
    """One .safetensors file: its header, read lazily tensor by tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise SafetensorsError(f"{self.path} is too short to be a safetensors file")
                (n,) = struct.unpack("<Q", raw)
                if n > 100_000_000:
                    raise SafetensorsError(f"{self.path} has an implausible header length {n}")
                header = json.loads(f.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path} is not a readable safetensors file: {e}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_offset = 8 + n
        self.entries = header
        size = self.path.stat().st_size
        for name, e in header.items():
            if e.get("dtype") not in DTYPES or e["data_offsets"][1] + self.data_offset > size:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has a bad dtype or lies past the end of the file")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        b, e = self.entries[name]["data_offsets"]
        return e - b

    def read(self, name: str) -> np.ndarray:
        """The tensor, read into a new array."""
        if name not in self.entries:
            raise SafetensorsError(f"{self.path} has no tensor {name!r}")
        e = self.entries[name]
        begin, end = e["data_offsets"]
        dtype = DTYPES[e["dtype"]]
        count = (end - begin) // dtype.itemsize
        with open(self.path, "rb") as f:
            arr = np.fromfile(f, dtype=dtype, count=count, offset=self.data_offset + begin)
        if arr.size != count:
            raise SafetensorsError(f"{self.path}: tensor {name!r} is truncated")
        return arr.reshape(e["shape"])


class Checkpoint(Mapping):
    """A lazy {name: array} view of a checkpoint: one file, or a directory with an index or
    with *.safetensors files. Reading a tensor opens only the file that holds it."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path
        self.files: dict[str, SafetensorsFile] = {}
        self.weight_map: dict[str, str] = {}
        if path.is_file():
            self._add(path)
        elif (path / INDEX).exists():
            try:
                index = json.loads((path / INDEX).read_text())
                weight_map = index["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise SafetensorsError(f"{path / INDEX} is not a valid index: {e}") from None
            for fname in sorted(set(weight_map.values())):
                if not (path / fname).exists():
                    raise SafetensorsError(f"{path / INDEX} names {fname}, which is missing")
                self._add(path / fname)
            missing = [n for n, f in weight_map.items() if n not in self.files[f].entries]
            if missing:
                raise SafetensorsError(f"{path / INDEX} lists tensors absent from their files: {missing[:5]}")
            self.weight_map = dict(weight_map)
        elif path.is_dir() and sorted(path.glob("*.safetensors")):
            for f in sorted(path.glob("*.safetensors")):
                self._add(f)
        else:
            raise SafetensorsError(f"no safetensors checkpoint at {path}")

    def _add(self, file: Path) -> None:
        st = SafetensorsFile(file)
        self.files[file.name] = st
        for name in st.keys():
            self.weight_map.setdefault(name, file.name)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise KeyError(name)
        return self.files[self.weight_map[name]].read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.weight_map[name]].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self.files[self.weight_map[name]].dtype(name)

    def file_of(self, name: str) -> str:
        return self.weight_map[name]

    def nbytes(self) -> int:
        return sum(self.files[f].nbytes(n) for n, f in self.weight_map.items())

    def metadata(self) -> dict:
        out: dict = {}
        for f in self.files.values():
            out.update(f.metadata)
        return out


def load_safetensors(path: str | os.PathLike, lazy: bool = True) -> Checkpoint | dict[str, np.ndarray]:
    """A checkpoint as a lazy mapping (lazy=True) or a dict of numpy arrays."""
    ckpt = Checkpoint(path)
    return ckpt if lazy else {name: ckpt[name] for name in ckpt}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{name: array} from a flat dict or a nested dict/list pytree (keys joined with ".")."""
    if hasattr(tree, "shape") and not isinstance(tree, Mapping):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, Mapping) else enumerate(tree)
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class ShardedWriter:
    """Stream tensors into `model-0000i-of-0000N.safetensors` shards plus an index (or one
    `model.safetensors` when everything fits in one shard). Memory: one tensor."""

    def __init__(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB", metadata: dict | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._shards: list[tuple[Path, dict]] = []  # (data file, header entries)
        self._data = None
        self._entries: dict = {}
        self._offset = 0
        self._names: set[str] = set()
        self.total = 0

    def _open_shard(self):
        tmp = self.directory / f".shard-{len(self._shards):05d}.data"
        self._data = open(tmp, "wb")
        self._entries = {}
        self._offset = 0
        self._shards.append((tmp, self._entries))

    def add(self, name: str, array) -> None:
        if name in self._names:
            raise SafetensorsError(f"tensor {name!r} written twice")
        arr = np.ascontiguousarray(np.asarray(array))
        nbytes = arr.nbytes
        if self._data is None or (self._offset and self._offset + nbytes > self.max_bytes):
            if self._data is not None:
                self._data.close()
            self._open_shard()
        arr.astype(arr.dtype.newbyteorder("<"), copy=False).tofile(self._data)
        self._entries[name] = {"dtype": dtype_name(arr.dtype), "shape": list(arr.shape),
                               "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes
        self._names.add(name)
        self.total += nbytes

    def close(self) -> list[Path]:
        """Write the shard files (header + data) and the index; returns the files written."""
        if self._data is not None:
            self._data.close()
        if not self._shards:
            self._open_shard()
            self._data.close()
        n = len(self._shards)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        written = []
        for (tmp, entries), fname in zip(self._shards, names):
            header = dict(entries)
            header["__metadata__"] = {k: str(v) for k, v in self.metadata.items()}
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * ((8 - len(blob) % 8) % 8)
            final = self.directory / fname
            part = final.with_name(final.name + ".part")
            with open(part, "wb") as out, open(tmp, "rb") as data:
                out.write(struct.pack("<Q", len(blob)))
                out.write(blob)
                while chunk := data.read(64 << 20):
                    out.write(chunk)
            os.replace(part, final)
            tmp.unlink()
            written.append(final)
            weight_map.update({k: fname for k in entries})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2))
            written.append(self.directory / INDEX)
        elif (self.directory / INDEX).exists():
            (self.directory / INDEX).unlink()
        self._shards = []
        self._data = None
        return written


def save_safetensors(tree: Mapping | Any, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                     metadata: dict | None = None) -> list[Path]:
    """Write a flat {name: array} dict (or a nested pytree, names joined with ".").

    `path` ending in .safetensors: one file. Otherwise a directory in the Hugging Face layout
    (model.safetensors, or shards of at most max_shard_size with an index).
    """
    flat = _flatten(tree)
    path = Path(path)
    if path.suffix == ".safetensors":
        writer = ShardedWriter(path.parent, max_shard_size=1 << 62, metadata=metadata)
        for name, arr in flat.items():
            writer.add(name, arr)
        files = writer.close()
        os.replace(files[0], path)
        return [path]
    writer = ShardedWriter(path, max_shard_size=max_shard_size, metadata=metadata)
    for name, arr in flat.items():
        writer.add(name, arr)
    return writer.close()
