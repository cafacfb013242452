"""A PyTorch state dict file (`torch.save`'s zip format) written without PyTorch.

`torch.save(state_dict, path)` writes a zip archive, stored uncompressed, under one folder named after the file:
`data.pkl` (a protocol-2 pickle of an OrderedDict whose values rebuild tensors through
`torch._utils._rebuild_tensor_v2`, each naming its storage by a persistent id), one record `data/<n>` per storage
(its raw little-endian bytes, 64-byte aligned in the file as torch aligns them for `torch.load(mmap=True)`),
`byteorder` and `version`. This module writes the same records for numpy arrays, so exports carry `model.pth` where
torch is not installed, and a run does not import torch (about 1.5 s) to save its weights.
`torch.load(..., weights_only=True)` reads the file: it holds only the globals that loader allows
(tests/test_export_timm.py checks it against torch).
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from onepfrac_jax.files import write_file

# numpy dtype → the storage class torch pickles for it (torch/storage.py's legacy names, which torch.load maps back)
_STORAGES = {
    np.dtype("float32"): "FloatStorage",
    np.dtype("float64"): "DoubleStorage",
    np.dtype("float16"): "HalfStorage",
    np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage",
    np.dtype("int16"): "ShortStorage",
    np.dtype("int8"): "CharStorage",
    np.dtype("uint8"): "ByteStorage",
    np.dtype("bool"): "BoolStorage",
}
_ALIGNMENT = 64  # torch's storage alignment (its `.storage_alignment` record)
_PADDING_FIELD = 0xCAFE  # the id of the zip extra field that pads a record's data to the alignment; readers skip it
_VERSION = b"3\n"  # the zip format's version record, as torch.save writes it


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _value(x: str | int | bool | tuple) -> bytes:
    """Pickle's own protocol-2 opcodes for a str, int, bool or a tuple of them (without its PROTO and STOP)."""
    return pickle.dumps(x, protocol=2)[2:-1]


def _ordered_dict() -> bytes:
    """An empty `collections.OrderedDict()`."""
    return _global("collections", "OrderedDict") + b")R"  # EMPTY_TUPLE, REDUCE


def _tensor(array: np.ndarray, key: str) -> bytes:
    """`_rebuild_tensor_v2(storage <key>, offset 0, shape, contiguous strides, requires_grad False, no hooks)`."""
    kind = _STORAGES[array.dtype.newbyteorder("=")]
    storage = (b"(" + _value("storage") + _global("torch", kind) + _value(key) + _value("cpu") + _value(int(array.size))
               + b"tQ")  # TUPLE, BINPERSID: the persistent id torch.load resolves
    strides, stride = [], 1
    for n in reversed(array.shape):  # torch's contiguous strides: an empty axis counts as 1 (numpy's say 0)
        strides.insert(0, stride)
        stride *= max(int(n), 1)
    args = storage + _value(0) + _value(tuple(int(n) for n in array.shape)) + _value(tuple(strides)) + _value(False)
    return _global("torch._utils", "_rebuild_tensor_v2") + b"(" + args + _ordered_dict() + b"tR"


def _pickle(arrays: Mapping[str, np.ndarray]) -> bytes:
    items = b"".join(_value(name) + _tensor(array, str(i)) for i, (name, array) in enumerate(arrays.items()))
    return b"\x80\x02" + _ordered_dict() + b"(" + items + b"u."  # MARK ... SETITEMS, STOP


def _record(archive: zipfile.ZipFile, buffer: io.BytesIO, name: str, data: bytes) -> None:
    """A stored record whose data starts at a multiple of the alignment (a padding extra field in its header)."""
    info = zipfile.ZipInfo(name)  # date_time 1980-01-01: the file depends on the weights alone
    start = buffer.tell() + 30 + len(name.encode())  # the local header is 30 bytes, then the name, then the extra
    pad = -start % _ALIGNMENT
    if pad:
        pad += _ALIGNMENT if pad < 4 else 0  # an extra field is at least its 4-byte header
        info.extra = struct.pack("<HH", _PADDING_FIELD, pad - 4) + bytes(pad - 4)
    archive.writestr(info, data, compress_type=zipfile.ZIP_STORED)


def pth_bytes(tensors: Mapping[str, np.ndarray], archive_name: str = "archive") -> bytes:
    """The bytes `torch.save` of an OrderedDict of these tensors would hold (`archive_name`: the folder inside)."""
    arrays = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        if array.dtype.newbyteorder("=") not in _STORAGES:
            raise ValueError(f"{name}: a .pth of {array.dtype} tensors is not supported "
                             f"(supported: {', '.join(sorted(d.name for d in _STORAGES))})")
        arrays[name] = np.require(array, array.dtype.newbyteorder("<"), "C")  # keeps a 0-d array 0-d
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        _record(archive, buffer, f"{archive_name}/data.pkl", _pickle(arrays))
        _record(archive, buffer, f"{archive_name}/byteorder", b"little")
        for i, array in enumerate(arrays.values()):
            _record(archive, buffer, f"{archive_name}/data/{i}", array.tobytes())
        _record(archive, buffer, f"{archive_name}/version", _VERSION)
    return buffer.getvalue()


def write_pth(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """A plain PyTorch state dict file at `path`, whole or not at all (files.write_file)."""
    write_file(Path(path), pth_bytes(tensors, Path(path).stem))
