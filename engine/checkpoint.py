"""Reading a Hugging Face safetensors checkpoint (single file or sharded) into our weight layout."""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.errors import CheckpointError


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a model directory, refusing pickle-only checkpoints."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed safetensors index ({e})") from e
        files = sorted({os.path.join(path, name) for name in weight_map.values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise CheckpointError(f"{path}: shards named in the index are missing: {missing}")
        return files
    if os.path.isfile(single):
        return [single]
    if any(n.endswith(".bin") or n.endswith(".pt") for n in os.listdir(path)):
        raise CheckpointError(f"{path}: only pickle weights (.bin/.pt) found; multilora loads "
                              "safetensors only (convert with transformers' save_pretrained(safe_serialization=True))")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{file}: cannot read safetensors ({e})") from e
    return tensors


def load_weights(path: str, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Weights in the engine's layout: fused qkv and gate_up per layer, checked against the config.

    Keys: embed, norm, lm_head, and per layer ``{i}.input_norm``, ``{i}.qkv``, ``{i}.qkv_bias``
    (optional), ``{i}.o``, ``{i}.o_bias`` (optional), ``{i}.post_norm``, ``{i}.gate_up``,
    ``{i}.gate_up_bias`` (optional), ``{i}.down``, ``{i}.down_bias`` (optional).
    """
    raw = read_tensors(path)
    shapes = config.projection_shapes()

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in raw:
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        t = raw.pop(name)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        return t.to(device=device, dtype=dtype)

    def linear(prefix: str, proj: str, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        n_in, n_out = shapes[proj]
        w = take(f"{prefix}.{proj}.weight", (n_out, n_in))
        b = take(f"{prefix}.{proj}.bias", (n_out,)) if bias else None
        return w, b

    h = config.hidden_size
    out = {"embed": take("model.embed_tokens.weight", (config.vocab_size, h)),
           "norm": take("model.norm.weight", (h,))}
    if config.tie_word_embeddings or "lm_head.weight" not in raw:
        if not config.tie_word_embeddings:
            raise CheckpointError(f"{path}: lm_head.weight is missing and tie_word_embeddings is false")
        out["lm_head"] = out["embed"]
        raw.pop("lm_head.weight", None)
    else:
        out["lm_head"] = take("lm_head.weight", (config.vocab_size, h))
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        out[f"{i}.input_norm"] = take(f"{p}.input_layernorm.weight", (h,))
        out[f"{i}.post_norm"] = take(f"{p}.post_attention_layernorm.weight", (h,))
        qkv = [linear(f"{p}.self_attn", n, config.attention_bias) for n in ("q_proj", "k_proj", "v_proj")]
        out[f"{i}.qkv"] = torch.cat([w for w, _ in qkv])
        if config.attention_bias:
            out[f"{i}.qkv_bias"] = torch.cat([b for _, b in qkv])
        out[f"{i}.o"], o_bias = linear(f"{p}.self_attn", "o_proj", config.o_bias)
        gate_up = [linear(f"{p}.mlp", n, config.mlp_bias) for n in ("gate_proj", "up_proj")]
        out[f"{i}.gate_up"] = torch.cat([w for w, _ in gate_up])
        out[f"{i}.down"], down_bias = linear(f"{p}.mlp", "down_proj", config.mlp_bias)
        if o_bias is not None:
            out[f"{i}.o_bias"] = o_bias
        if config.mlp_bias:
            out[f"{i}.gate_up_bias"] = torch.cat([b for _, b in gate_up])
            out[f"{i}.down_bias"] = down_bias
    leftover = [k for k in raw if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise CheckpointError(f"{path}: unexpected tensors {leftover[:5]}{'...' if len(leftover) > 5 else ''}")
    return out


def random_weights(config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the engine's layout (load_format "dummy"), for benchmarks without a checkpoint."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = config.projection_shapes()
    h, i = config.hidden_size, config.intermediate_size

    def rand(*shape: int) -> torch.Tensor:
        t = torch.empty(*shape, dtype=dtype, device=device)
        return t.normal_(0.0, 0.02, generator=gen)

    out = {"embed": rand(config.vocab_size, h), "norm": torch.ones(h, dtype=dtype, device=device)}
    out["lm_head"] = out["embed"] if config.tie_word_embeddings else rand(config.vocab_size, h)
    qkv_out = shapes["q_proj"][1] + 2 * shapes["k_proj"][1]
    for layer in range(config.num_layers):
        out[f"{layer}.input_norm"] = torch.ones(h, dtype=dtype, device=device)
        out[f"{layer}.post_norm"] = torch.ones(h, dtype=dtype, device=device)
        out[f"{layer}.qkv"] = rand(qkv_out, h)
        if config.attention_bias:
            out[f"{layer}.qkv_bias"] = rand(qkv_out)
        out[f"{layer}.o"] = rand(h, shapes["o_proj"][0])
        out[f"{layer}.gate_up"] = rand(2 * i, h)
        out[f"{layer}.down"] = rand(h, i)
    return out
