"""Reading a .safetensors file with one read and no per-tensor work in Python beyond a view.

Adapters are read by loader threads while the engine thread runs steps in the same interpreter.
The safetensors package's torch path builds each tensor through Python-level storage slicing,
holding the GIL for most of an adapter's load; here the file is read once into a private buffer
(the read frees the GIL) and each tensor is a numpy view of it, wrapped by torch without a copy.
One buffer, not a mapping of the file: what is hashed for the adapter's digest and what is packed
for serving are the same bytes even when the file is rewritten while it is read (a private
mapping shows later writes to pages not yet touched). ``parse_safetensors`` reads bytes that came
over the wire (an upload) the same way.

Format: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data (offsets relative to it).
"""
from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import torch

# safetensors dtype -> (numpy dtype of the bytes, torch dtype to view them as, or None)
_DTYPES = {
    "F64": (np.float64, None), "F32": (np.float32, None), "F16": (np.float16, None),
    "BF16": (np.int16, torch.bfloat16),
    "I64": (np.int64, None), "I32": (np.int32, None), "I16": (np.int16, None), "I8": (np.int8, None),
    "U8": (np.uint8, None), "BOOL": (np.bool_, None),
}
MAX_HEADER_BYTES = 100 << 20


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of the file, as CPU tensors sharing one private buffer. Raises ValueError
    saying what is wrong with a file that is not valid safetensors."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        data = bytearray(size)
        view = memoryview(data)
        filled = 0
        while filled < size:  # a file truncated meanwhile gives fewer bytes: parse what was read
            n = f.readinto(view[filled:])
            if not n:
                break
            filled += n
    return parse_safetensors(data if filled == size else data[:filled])


def parse_safetensors(data: bytes | bytearray) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes, as views of ``data``. Views of read-only bytes (an
    upload) are read-only too: they are only read (packing copies them), so no copy is made."""
    if len(data) < 8:
        raise ValueError(f"the file has {len(data)} bytes; a safetensors file starts with an 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, MAX_HEADER_BYTES):
        raise ValueError(f"header length {n} is beyond the file's {len(data)} bytes")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"the header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    buffer = np.frombuffer(data, dtype=np.uint8, offset=8 + n)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            np_dtype, view = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"tensor {name!r}: bad header entry {info!r} ({e!r})") from e
        size = math.prod(shape) * np.dtype(np_dtype).itemsize
        if not 0 <= begin <= end <= buffer.shape[0] or end - begin != size:
            raise ValueError(f"tensor {name!r}: data_offsets {[begin, end]} do not hold shape {shape} of "
                             f"{info['dtype']} within the file's {buffer.shape[0]} data bytes")
        array = buffer[begin:end].view(np_dtype).reshape(shape)
        with warnings.catch_warnings():  # read-only bytes: torch warns that writing them is undefined
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        tensors[name] = tensor.view(view) if view is not None else tensor
    return tensors
