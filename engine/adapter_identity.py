"""What makes two adapters the same: a digest of the bytes that change serving.

A loaded adapter is known by its digest, not by its name: the GPU pool and the host tier are
keyed by it, a request keeps the digest it was admitted with to its end, and two names with the
same bytes share one copy. The digest is sha256 over length-prefixed records of
- a version tag,
- the base model's fingerprint and the serving dtype (an adapter packed for another base or
  dtype is another thing in memory),
- the canonical ``adapter_config.json`` fields that change serving (r, lora_alpha, use_rslora,
  target_modules, alpha_pattern, rank_pattern),
- each tensor's name, dtype, shape and bytes, in name order,
all taken from the buffers that are packed for serving (``read_safetensors`` reads the file once
into memory): a file that changes while it is read cannot give a digest of other bytes.

No torch beyond the tensors handed in; ``file_stamp`` is what resolution compares to notice an
adapter changed on disk (size, mtime, inode of both files).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import torch

DIGEST_VERSION = b"multilora-adapter-digest-v1"
SERVING_CONFIG_FIELDS = ("r", "lora_alpha", "use_rslora", "target_modules", "alpha_pattern", "rank_pattern")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _record(h: "hashlib._Hash", data: bytes | memoryview) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def serving_config(cfg: dict[str, Any]) -> bytes:
    """The adapter_config.json fields that change serving, as canonical JSON."""
    fields = {}
    for key in SERVING_CONFIG_FIELDS:
        value = cfg.get(key)
        if key == "target_modules" and isinstance(value, list):
            value = sorted(str(v) for v in value)
        fields[key] = value
    return json.dumps(fields, sort_keys=True, default=str).encode()


def adapter_digest(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], salt: bytes) -> str:
    """sha256 hex of an adapter's serving identity (see the module docstring)."""
    h = hashlib.sha256()
    _record(h, DIGEST_VERSION)
    _record(h, salt)
    _record(h, serving_config(cfg))
    for name in sorted(tensors):
        t = tensors[name]
        _record(h, name.encode())
        _record(h, str(t.dtype).removeprefix("torch.").encode())
        _record(h, json.dumps(list(t.shape)).encode())
        # the bytes as stored (views of the buffer read from the file): hashlib frees the GIL
        _record(h, memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def base_fingerprint(model_dir: str, model_config: Any, load_format: str = "safetensors", seed: int = 0) -> bytes:
    """The base model's identity for adapter digests: its config's shape fields and the header
    (names, dtypes, shapes, offsets) of each safetensors file. Cheap (no weight bytes read), and
    enough to tell bases of other shapes or checkpoints apart; a fine-tune rewritten in place
    with identical headers is the same base to it."""
    h = hashlib.sha256()
    config = dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else dict(model_config)
    _record(h, json.dumps(config, sort_keys=True, default=str).encode())
    if load_format == "dummy":
        _record(h, f"dummy:{seed}".encode())
        return h.hexdigest().encode()
    names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors")) if os.path.isdir(model_dir) else []
    for name in names:
        with open(os.path.join(model_dir, name), "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = f.read(min(size, 100 << 20))
        _record(h, name.encode())
        _record(h, header)
    return h.hexdigest().encode()


def serving_salt(fingerprint: bytes, dtype: torch.dtype) -> bytes:
    return fingerprint + b"|" + str(dtype).removeprefix("torch.").encode()


def file_stamp(path: str) -> tuple | None:
    """(size, mtime_ns, inode) of an adapter directory's two files, or None if one is missing."""
    stamp = []
    for name in ADAPTER_FILES:
        try:
            st = os.stat(os.path.join(path, name))
        except OSError:
            return None
        stamp.append((st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(stamp)
