"""Read a PyTorch state dict saved in the legacy (pre-1.6, non-zip) format, without torch.

The format is a run of pickles: magic number, protocol version, system info, the state dict
(tensors refer to storages by persistent id), the list of storage keys, then each storage's raw
bytes behind an 8-byte element count. A pickle can run any code it names, so the unpickler here
allows only the globals a state dict needs (OrderedDict, the tensor rebuild function, storage
types) and refuses every other one: a tampered file fails to load instead of running code.
"""
from __future__ import annotations

import collections
import pickle
import struct
from pathlib import Path

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class UnsafeCheckpoint(pickle.UnpicklingError):
    """The file names a global a state dict never needs; it is refused, not run."""


class _StorageRef:
    def __init__(self, dtype, key: str, size: int):
        self.dtype, self.key, self.size = dtype, key, size


class _TensorRef:
    def __init__(self, storage: _StorageRef, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored):
    return _TensorRef(storage, storage_offset, size, stride)


class _StateDictUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise UnsafeCheckpoint(f"refused global {module}.{name}: a state dict needs only tensors and OrderedDict")

    def persistent_load(self, saved_id):
        typename, dtype, key, _location, size, *_view = saved_id
        if typename != "storage" or dtype not in STORAGE_DTYPES.values():
            raise UnsafeCheckpoint(f"unexpected persistent id {saved_id!r}")
        return _StorageRef(dtype, str(key), int(size))


class _PlainUnpickler(pickle.Unpickler):
    """For the header and the key list: plain data only, no globals at all."""

    def find_class(self, module, name):
        raise UnsafeCheckpoint(f"refused global {module}.{name} in the checkpoint's header")


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The state dict in `path` as {name: numpy array}; raises UnsafeCheckpoint or ValueError."""
    path = Path(path)
    with open(path, "rb") as f:
        if _PlainUnpickler(f).load() != MAGIC_NUMBER:
            raise ValueError(f"{path}: not a legacy PyTorch checkpoint (magic number differs)")
        if _PlainUnpickler(f).load() != PROTOCOL_VERSION:
            raise ValueError(f"{path}: unsupported legacy PyTorch protocol version")
        sys_info = _PlainUnpickler(f).load()
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        state = _StateDictUnpickler(f).load()
        keys = _PlainUnpickler(f).load()
        storages = {ref.storage.key: ref.storage for ref in state.values() if isinstance(ref, _TensorRef)}
        data = {}
        for key in keys:
            dtype = np.dtype(storages[key].dtype)
            (count,) = struct.unpack("<q", f.read(8))
            raw = f.read(count * dtype.itemsize)
            if len(raw) != count * dtype.itemsize:
                raise ValueError(f"{path}: truncated storage {key}")
            data[key] = np.frombuffer(raw, dtype=dtype)
    out = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            raise ValueError(f"{path}: entry {name!r} is not a tensor")
        flat = data[ref.storage.key]
        itemsize = flat.dtype.itemsize
        out[name] = np.lib.stride_tricks.as_strided(
            flat[ref.offset:], shape=ref.shape, strides=tuple(s * itemsize for s in ref.stride)).copy()
    return out
