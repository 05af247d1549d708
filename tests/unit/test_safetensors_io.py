"""engine.safetensors_io reads what the safetensors package writes, and says what is wrong with
files that are not valid."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.safetensors_io import read_safetensors


def test_reads_every_dtype_like_the_safetensors_package(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "i64": torch.arange(5),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    ours, theirs = read_safetensors(path), load_file(path)
    assert set(ours) == set(theirs) == set(tensors)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape and torch.equal(ours[name], t), name
    ours["f32"].mul_(2)  # writable: a private copy-on-write mapping; the file keeps its values
    assert torch.equal(load_file(path)["f32"], tensors["f32"])


def _write(path, header, data=b""):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("content, message", [
    (b"", "8-byte header length"),
    (struct.pack("<Q", 1000) + b"{}", "beyond the file"),
    (struct.pack("<Q", 3) + b"{x]", "not valid JSON"),
])
def test_broken_files_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_safetensors(str(path))


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, "do not hold shape"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}, "do not hold shape"),
    ({"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, "bad header entry"),
    ({"dtype": "F32", "shape": [2]}, "bad header entry"),
])
def test_bad_header_entries_are_named(tmp_path, entry, message):
    path = str(tmp_path / "bad.safetensors")
    _write(path, {"w": entry}, bytes(16))
    with pytest.raises(ValueError, match=rf"tensor 'w': .*{message}"):
        read_safetensors(path)
