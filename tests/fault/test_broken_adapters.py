"""Broken PEFT adapter directories under a temporary lora_roots folder of a copy of the model
repository, each named by a request to one real tritonserver on the demo model.

Each gets INVALID_ARG (NOT_FOUND where no adapter is there: a directory without
adapter_config.json) with a message that names the adapter and the field or tensor at fault and
holds no server path, twice (a refused adapter is not half-loaded). Afterwards ``upper``, served
from the same root, is still exact, the model READY and the engine idle.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from e2e_helpers import ROOT, StreamClient, copy_model_repository, start_server
from fault_helpers import failure_counts, failure_deltas, is_ready, settled_baseline, wait_for_idle
from helpers import write_raw_adapter

pytestmark = pytest.mark.e2e

INVALID, NOT_FOUND = "invalid_arg", "not_found"
NUM_LAYERS, MAX_LORA_RANK = 4, 64
# demo model: hidden 128, 4 query heads and 2 KV heads of 32, intermediate 512
SHAPES = {"q_proj": (128, 128), "k_proj": (128, 64), "v_proj": (128, 64), "o_proj": (128, 128),
          "gate_proj": (128, 512), "up_proj": (128, 512), "down_proj": (512, 128)}
MODULES = ["q_proj", "v_proj"]
SAMPLING = {"max_tokens": 8, "temperature": 0}
KEY = "base_model.model.model.layers.{layer}.self_attn.{module}.lora_{which}.weight"


def good(path: Path, rank: int = 4, modules=MODULES, **config) -> Path:
    """A valid rank-``rank`` adapter, its adapter_config.json updated with ``config``."""
    write_raw_adapter(str(path), NUM_LAYERS, SHAPES, rank, list(modules), seed=0)
    if config:
        edit_config(path, **config)
    return path


def edit_config(path: Path, **values) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(values)
    (path / "adapter_config.json").write_text(json.dumps(config))


def raw_config(text: str):
    def build(path: Path) -> None:
        good(path)
        (path / "adapter_config.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return build


def config(**values):
    return lambda path: good(path, **values)


def tensors(edit):
    """A good adapter whose tensors dict goes through ``edit`` (in place) and is saved again."""
    def build(path: Path) -> None:
        good(path)
        from safetensors.torch import load_file
        weights = load_file(str(path / "adapter_model.safetensors"))
        edit(weights)
        save_file(weights, str(path / "adapter_model.safetensors"))
    return build


def key(layer: int = 0, module: str = "q_proj", which: str = "A") -> str:
    return KEY.format(layer=layer, module=module, which=which)


def set_tensor(name: str, value: torch.Tensor):
    return tensors(lambda weights: weights.__setitem__(name, value))


def poison(name: str, value: float):
    def edit(weights):
        weights[name] = weights[name].clone()
        weights[name][0, 0] = value
    return tensors(edit)


def weights_bytes(edit):
    """A good adapter whose safetensors file's bytes go through ``edit``."""
    def build(path: Path) -> None:
        good(path)
        file = path / "adapter_model.safetensors"
        file.write_bytes(edit(file.read_bytes()))
    return build


def header_edit(edit):
    """Rewrite the safetensors JSON header (``edit`` changes the dict in place), data unchanged."""
    def change(data: bytes) -> bytes:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
        edit(header)
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + data[8 + length:]
    return weights_bytes(change)


def first_tensor(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def remove(name: str):
    def build(path: Path) -> None:
        good(path)
        (path / name).unlink()
    return build


def pickle_only(path: Path) -> None:
    good(path)
    from safetensors.torch import load_file
    torch.save(load_file(str(path / "adapter_model.safetensors")), str(path / "adapter_model.bin"))
    (path / "adapter_model.safetensors").unlink()


def symlinked(what: str):
    """The adapter directory, or one of its files, a symlink to a good adapter outside the root."""
    def build(path: Path) -> None:
        outside = good(path.parent.parent / "outside" / path.name)
        if what == "directory":
            path.symlink_to(outside, target_is_directory=True)
        else:
            good(path)
            (path / what).unlink()
            (path / what).symlink_to(outside / what)
    return build


def weights_a_directory(path: Path) -> None:
    good(path)
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.safetensors").mkdir()


def drop(name: str):
    return tensors(lambda weights: weights.pop(name))


def rank_mismatch(weights) -> None:
    weights[key(which="B")] = torch.zeros(128, 5)


# name: (builder of the adapter directory, failure reason, words the message holds)
CASES = {
    # files
    "empty_directory": (lambda path: path.mkdir(), NOT_FOUND, ["is not known"]),
    "no_config": (remove("adapter_config.json"), NOT_FOUND, ["is not known"]),
    "no_weights": (remove("adapter_model.safetensors"), INVALID, ["adapter_model.safetensors is missing"]),
    "pickle_bin_only": (pickle_only, INVALID, ["adapter_model.bin", "safetensors"]),
    "weights_a_directory": (weights_a_directory, INVALID, ["adapter_model.safetensors"]),
    "dir_symlink_out_of_root": (symlinked("directory"), INVALID, ["adapter directory", "symlink"]),
    "config_symlink_out_of_root": (symlinked("adapter_config.json"), INVALID, ["adapter_config.json", "symlink"]),
    "weights_symlink_out_of_root": (symlinked("adapter_model.safetensors"), INVALID,
                                    ["adapter_model.safetensors", "symlink"]),
    # adapter_config.json
    "config_not_json": (raw_config("{r: 4"), INVALID, ["adapter_config.json", "not valid JSON"]),
    "config_empty": (raw_config(""), INVALID, ["adapter_config.json"]),
    "config_invalid_utf8": (raw_config(b'{"r": 4, "x": "\xff"}'), INVALID, ["adapter_config.json"]),
    "config_array": (raw_config("[4, 8]"), INVALID, ["adapter_config.json", "JSON object"]),
    "config_nested_deeply": (raw_config('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"), INVALID,
                             ["adapter_config.json"]),
    "config_huge_integer": (raw_config('{"r": 1' + "0" * 5000 + "}"), INVALID, ["adapter_config.json"]),
    "peft_type_ia3": (config(peft_type="IA3"), INVALID, ["peft_type"]),
    "use_dora": (config(use_dora=True), INVALID, ["use_dora"]),
    "modules_to_save": (config(modules_to_save=["lm_head"]), INVALID, ["modules_to_save"]),
    "fan_in_fan_out": (config(fan_in_fan_out=True), INVALID, ["fan_in_fan_out"]),
    "r_string": (config(r="four"), INVALID, ["r must be"]),
    "r_null": (config(r=None), INVALID, ["r must be"]),
    "r_list": (config(r=[4]), INVALID, ["r must be"]),
    "r_zero": (config(r=0), INVALID, ["r"]),
    "r_negative": (config(r=-4), INVALID, ["r"]),
    "r_fraction": (config(r=4.5), INVALID, ["r"]),
    "r_above_max_lora_rank": (config(r=MAX_LORA_RANK + 1), INVALID, ["r"]),
    "r_disagrees_with_tensors": (config(r=8), INVALID, ["r"]),
    "alpha_string": (config(lora_alpha="eight"), INVALID, ["lora_alpha"]),
    "alpha_list": (config(lora_alpha=[8]), INVALID, ["lora_alpha"]),
    "alpha_infinity": (raw_config('{"peft_type": "LORA", "r": 4, "lora_alpha": Infinity, '
                                  '"target_modules": ["q_proj", "v_proj"]}'), INVALID, ["lora_alpha"]),
    "alpha_nan": (raw_config('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN, '
                             '"target_modules": ["q_proj", "v_proj"]}'), INVALID, ["lora_alpha"]),
    "alpha_1e30": (config(lora_alpha=1e30), INVALID, ["lora_alpha"]),
    "alpha_pattern_list": (config(alpha_pattern=[1]), INVALID, ["alpha_pattern"]),
    "alpha_pattern_string_value": (config(alpha_pattern={"q_proj": "x"}), INVALID, ["alpha_pattern"]),
    "alpha_pattern_bad_regex": (config(alpha_pattern={"(": 8}), INVALID, ["alpha_pattern"]),
    "alpha_pattern_infinite": (config(alpha_pattern={"q_proj": 1e300 * 1e300}), INVALID, ["lora_alpha"]),
    "target_modules_unknown": (config(target_modules=["lm_head"]), INVALID, ["target_modules"]),
    "target_modules_missing_one": (config(target_modules=["q_proj"]), INVALID, ["v_proj", "target_modules"]),
    "target_modules_number": (config(target_modules=5), INVALID, ["target_modules"]),
    "target_modules_regex_misses": (config(target_modules=r".*\.k_proj"), INVALID, ["q_proj", "target_modules"]),
    "target_modules_bad_regex": (config(target_modules="("), INVALID, ["target_modules"]),
    "rank_pattern_disagrees": (config(rank_pattern={"v_proj": 8}), INVALID, ["v_proj", "rank_pattern"]),
    "rank_pattern_zero": (config(rank_pattern={"q_proj": 0}), INVALID, ["rank_pattern"]),
    "rank_pattern_list": (config(rank_pattern=[4]), INVALID, ["rank_pattern"]),
    "r_bool": (config(r=True), INVALID, ["r must be"]),
    # tensors
    "rank_above_max_lora_rank": (lambda path: good(path, rank=MAX_LORA_RANK + 1), INVALID, ["max_lora_rank"]),
    "a_wrong_in_features": (set_tensor(key(), torch.zeros(4, 127)), INVALID, ["layer 0 q_proj", "lora_A"]),
    "b_wrong_out_features": (set_tensor(key(which="B"), torch.zeros(127, 4)), INVALID, ["layer 0 q_proj", "lora_B"]),
    "a_and_b_ranks_differ": (tensors(rank_mismatch), INVALID, ["layer 0 q_proj"]),
    "a_transposed": (set_tensor(key(), torch.zeros(128, 4)), INVALID, ["layer 0 q_proj", "lora_A"]),
    "a_3d": (set_tensor(key(), torch.zeros(1, 4, 128)), INVALID, ["layer 0 q_proj", "matrices"]),
    "a_1d": (set_tensor(key(), torch.zeros(128)), INVALID, ["layer 0 q_proj", "matrices"]),
    "rank_zero_tensors": (lambda path: good(path, rank=0), INVALID, ["rank"]),
    "a_int32": (set_tensor(key(), torch.zeros(4, 128, dtype=torch.int32)), INVALID, ["layer 0 q_proj", "floating point"]),
    "b_bool": (set_tensor(key(which="B"), torch.zeros(128, 4, dtype=torch.bool)), INVALID,
               ["layer 0 q_proj", "floating point"]),
    "a_nan": (poison(key(layer=2), float("nan")), INVALID, ["layer 2 q_proj lora_A", "NaN or Inf"]),
    "b_inf": (poison(key(layer=1, module="v_proj", which="B"), float("inf")), INVALID,
              ["layer 1 v_proj lora_B", "NaN or Inf"]),
    "a_minus_inf": (poison(key(layer=3), float("-inf")), INVALID, ["layer 3 q_proj lora_A"]),
    "update_overflows_float32": (tensors(lambda w: [w.__setitem__(k, w[k] * 1e18) for k in list(w)]),
                                 INVALID, ["lora_B @ lora_A"]),
    "b_missing": (drop(key(which="B")), INVALID, ["layer 0 q_proj", "lora_A and lora_B"]),
    "unknown_module_tensor": (set_tensor("base_model.model.lm_head.lora_A.weight", torch.zeros(4, 128)), INVALID,
                              ["lm_head"]),
    "embed_tokens_tensor": (set_tensor("base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(4, 100)),
                            INVALID, ["embed_tokens"]),
    "unsupported_module_tensor": (set_tensor(KEY.format(layer=0, module="rotary_proj", which="A"),
                                             torch.zeros(4, 128)), INVALID, ["rotary_proj"]),
    "layer_beyond_base": (set_tensor(key(layer=NUM_LAYERS), torch.zeros(4, 128)), INVALID, ["layer 4"]),
    "bias_tensor": (set_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", torch.zeros(128)),
                    INVALID, ["lora_B.bias"]),
    "no_tensors": (tensors(lambda weights: weights.clear()), INVALID, ["no LoRA weights"]),
    # the safetensors file itself
    "weights_empty_file": (weights_bytes(lambda data: b""), INVALID, ["adapter_model.safetensors"]),
    "weights_truncated_in_header": (weights_bytes(lambda data: data[:20]), INVALID, ["adapter_model.safetensors"]),
    "weights_truncated_in_data": (weights_bytes(lambda data: data[:len(data) // 2]), INVALID,
                                  ["adapter_model.safetensors"]),
    "header_length_past_file": (weights_bytes(lambda data: struct.pack("<Q", 1 << 40) + data[8:]), INVALID,
                                ["adapter_model.safetensors"]),
    "header_not_json": (weights_bytes(lambda data: struct.pack("<Q", 4) + b"{{{{" + data[8:]), INVALID,
                        ["adapter_model.safetensors"]),
    "header_offsets_past_data": (header_edit(lambda h: first_tensor(h).__setitem__(
        "data_offsets", [0, 1 << 40])), INVALID, ["adapter_model.safetensors"]),
    "header_offsets_disagree_with_shape": (header_edit(lambda h: first_tensor(h).__setitem__(
        "shape", [4, 256])), INVALID, ["adapter_model.safetensors"]),
    "header_offsets_reversed": (header_edit(lambda h: first_tensor(h).__setitem__(
        "data_offsets", first_tensor(h)["data_offsets"][::-1])), INVALID, ["adapter_model.safetensors"]),
    "header_unknown_dtype": (header_edit(lambda h: first_tensor(h).__setitem__("dtype", "F128")), INVALID,
                             ["adapter_model.safetensors"]),
    "header_not_an_object": (weights_bytes(lambda data: struct.pack("<Q", 2) + b"[]"), INVALID,
                             ["adapter_model.safetensors"]),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("fault_adapters")
    lora_root = base / "lora_root"
    lora_root.mkdir()
    for name, (build, _, _) in CASES.items():
        build(lora_root / name)
    shutil.copytree(ROOT / "demo" / "adapters" / "upper", lora_root / "upper")
    engine_json = json.loads((ROOT / "model_repository" / "multilora" / "1" / "engine.json").read_text())
    engine_json.update(model=str(ROOT / "demo" / "base"), lora_roots=[str(lora_root)], max_lora_rank=MAX_LORA_RANK)
    repository = copy_model_repository(base / "repository", engine_json)
    # every adapter, upper too, from lora_root (the copied multi_lora.json names relative paths)
    (repository / "multilora" / "1" / "multi_lora.json").write_text("{}")
    server = start_server(repository, ready_timeout=180.0, log_file=base / "tritonserver.log")
    server.tmp_dir = str(base)
    try:
        assert_upper_is_exact(server)
        baseline = settled_baseline(server.metrics_url)
        yield server
        assert_upper_is_exact(server)
        assert is_ready(server.http_url)
        wait_for_idle(server.metrics_url, baseline)
    finally:
        server.stop()


def assert_upper_is_exact(server) -> None:
    with StreamClient(server.grpc_url) as client:
        client.send("upper", text="hello", lora_name="upper", sampling=SAMPLING, stream=False,
                    exclude_input_in_output=True)
        (response,) = client.collect(["upper"], quiet_s=0.1)["upper"]
    assert response.error is None and response.text == "HELLO", response


@pytest.mark.parametrize("case", list(CASES))
def test_broken_adapter_is_refused(server, case):
    _, reason, words = CASES[case]
    before = failure_counts(server.metrics_url)
    with StreamClient(server.grpc_url) as client:
        for attempt in ("first", "again"):  # a refused adapter is refused again, the same way
            client.send(attempt, text="hello", lora_name=case, sampling=SAMPLING)
        got = client.collect(["first", "again"], quiet_s=0.1)
    messages = []
    for attempt, responses in got.items():
        assert len(responses) == 1 and responses[0].final and responses[0].error, (attempt, responses)
        messages.append(responses[0].error)
    assert messages[0] == messages[1]
    message = messages[0]
    assert f"'{case}'" in message, message
    for word in words:
        assert word in message, (word, message)
    assert server.tmp_dir not in message and str(ROOT) not in message, message
    deltas = failure_deltas(before, failure_counts(server.metrics_url))
    assert deltas == {reason: 2}, (deltas, message)
