"""Shared pieces of the benchmarks: a Llama-7B-shaped model directory and random adapters."""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import write_tokenizer  # noqa: E402

from engine.adapters import LoRAAdapter, pack_adapter  # noqa: E402
from engine.config import ModelConfig  # noqa: E402

LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            "tie_word_embeddings": False}
# the shapes of bench/engine.py --shape: Llama 2 7B and 13B (MHA), Llama 2 70B (GQA, 8 KV heads),
# and a tiny one that runs on a CPU in seconds (to prove the harness)
SHAPES = {
    "7b": LLAMA_7B,
    "13b": {**LLAMA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
            "num_attention_heads": 40, "num_key_value_heads": 40},
    "70b": {**LLAMA_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8},
    "tiny": {**LLAMA_7B, "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
             "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024},
}
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = QKVO + ["gate_proj", "up_proj", "down_proj"]


def write_model_dir(path: str, config: dict | None = None) -> str:
    """config.json + a byte tokenizer; weights come from load_format="dummy"."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config or LLAMA_7B, f)
    write_tokenizer(path)
    return path


def random_adapter(name: str, model: ModelConfig, rank: int, modules: list[str], seed: int,
                   page_size: int, dtype: torch.dtype, pin_memory: bool):
    gen = torch.Generator().manual_seed(seed)
    shapes = model.projection_shapes()
    weights = []
    for _ in range(model.num_layers):
        layer = {}
        for m in modules:
            n_in, n_out = shapes[m]
            a = torch.randn(rank, n_in, generator=gen, dtype=torch.float32) * 0.01
            b = torch.randn(n_out, rank, generator=gen, dtype=torch.float32) * 0.01
            layer[m] = (a, b, 2.0)
        weights.append(layer)
    adapter = LoRAAdapter(name, "<random>", rank, tuple(modules), weights)
    return pack_adapter(adapter, model, page_size, dtype, pin_memory)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
