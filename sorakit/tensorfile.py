"""Reading safetensors files with numpy alone (no torch, no pickle, nothing executed).

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that follows), an
optional ``__metadata__`` entry, then the data. Every field is checked before any byte is
used, and every problem is a ``CheckpointError`` that names the file and the tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from sorakit.errors import CheckpointError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
MAX_HEADER = 100 * 2**20


def read_header(path: str | Path) -> tuple[dict[str, dict], int]:
    """(tensor name -> {dtype, shape, data_offsets}, offset of the data) after validating every entry."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{path} is not a safetensors file (header length {n} does not fit the file)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} has no dtype/shape/data_offsets record")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise CheckpointError(f"{where} lacks {', '.join(missing)} in the safetensors header")
        if entry["dtype"] not in DTYPES:
            raise CheckpointError(f"{where} has dtype {entry['dtype']!r}; readable: {', '.join(DTYPES)}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{where} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise CheckpointError(f"{where} has data offsets {offsets!r} outside the file's {data_size} data bytes")
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[entry["dtype"]]).itemsize
        if offsets[1] - offsets[0] != want:
            raise CheckpointError(f"{where}: shape {shape} of {entry['dtype']} needs {want} bytes, the file gives "
                                  f"{offsets[1] - offsets[0]}")
    return header, 8 + n


def read_tensors(path: str | Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as numpy arrays (memory-mapped, read-only)."""
    header, start = read_header(path)
    if names is not None:
        unknown = [k for k in names if k not in header]
        if unknown:
            raise CheckpointError(f"{path} has no tensors {unknown[:5]}")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name in names if names is not None else header:
        e = header[name]
        a, b = e["data_offsets"]
        out[name] = data[start + a : start + b].view(DTYPES[e["dtype"]]).reshape(e["shape"])
    return out
