"""On-disk array caches (decoded images, frozen-layer features), keyed by everything they depend on.

Each array is an .npy file read back memory-mapped, with a .json beside it holding its key, shape,
dtype and a checksum. A file whose checksum, size or key doesn't match is rebuilt, never used.
Writes go to a temporary name first, so a killed writer leaves nothing that looks finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from .phantoms import cache_root

CHUNK = 1 << 24


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# Files whose checksum this process has already checked or written, with the (mtime, size) they had
# then: a run reads the same decoded split many times (training, evaluation, flips, Grad-CAM), and
# hashing 700 MB each time cost seconds. Any write since changes the mtime, and the file is checked again.
_checked: dict[Path, tuple[int, int]] = {}


def _stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_mtime_ns, info.st_size


def _usable(data: Path, meta: Path, key: dict, shape: tuple, dtype) -> bool:
    if not (data.is_file() and meta.is_file()):
        return False
    try:
        recorded = json.loads(meta.read_text())
        stamp = _stamp(data)
        ok = (recorded["key"] == json.loads(json.dumps(key, default=str)) and tuple(recorded["shape"]) == shape
              and recorded["dtype"] == np.dtype(dtype).str
              and (_checked.get(data) == stamp or recorded["checksum"] == _digest(data)))
    except (ValueError, KeyError, OSError):
        ok = False
    if not ok:
        print(f"cache: {data} is corrupt, truncated or stale; rebuilding it", file=sys.stderr)
        return False
    _checked[data] = stamp
    return True


class Entry:
    """One cached array: `load()` it if valid, else `write()` it (a context giving the array to fill)."""

    def __init__(self, kind: str, key: dict, shape: tuple, dtype, root: Path | None = None):
        self.folder = (root or cache_root() / "arrays") / kind
        self.key, self.shape, self.dtype = key, tuple(int(n) for n in shape), np.dtype(dtype)
        name = key_hash(key)
        self.data, self.meta = self.folder / f"{name}.npy", self.folder / f"{name}.json"
        self._partial = self.folder / f".{name}.{os.getpid()}.partial.npy"

    def load(self) -> np.ndarray | None:
        if not _usable(self.data, self.meta, self.key, self.shape, self.dtype):
            return None
        return np.load(self.data, mmap_mode="r")

    def open(self) -> np.ndarray:
        self.folder.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(self._partial, mode="w+", dtype=self.dtype, shape=self.shape)

    def commit(self, out: np.ndarray) -> np.ndarray:
        out.flush()
        del out
        record = {"key": self.key, "shape": self.shape, "dtype": self.dtype.str, "checksum": _digest(self._partial)}
        os.replace(self._partial, self.data)
        _checked[self.data] = _stamp(self.data)
        partial_meta = self._partial.with_suffix(".json")
        partial_meta.write_text(json.dumps(record, default=str, indent=1))
        os.replace(partial_meta, self.meta)
        return np.load(self.data, mmap_mode="r")

    def discard(self) -> None:
        self._partial.unlink(missing_ok=True)


def cached_array(kind: str, key: dict, shape: tuple, dtype, fill: Callable[[np.ndarray], None],
                 root: Path | None = None) -> np.ndarray:
    """The array for `key`, read-only and memory-mapped; built by `fill(out)` when missing or invalid."""
    entry = Entry(kind, key, shape, dtype, root)
    found = entry.load()
    if found is not None:
        return found
    try:
        out = entry.open()
        fill(out)
        return entry.commit(out)
    finally:
        entry.discard()
