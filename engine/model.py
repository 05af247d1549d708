"""The Llama-family transformer (Llama 2/3, Mistral, Qwen2) over a flat batch of mixed prefill/decode tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.ops import Ops
from engine.config import ModelConfig
from engine.lora_batch import LoRABatch
from engine.rope import RotaryCache

if TYPE_CHECKING:
    from engine.parallel import TensorParallel


@dataclass
class AttentionMetadata:
    """Where each token of the step sits. S sequences, T tokens, MB max blocks per sequence."""

    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, KV cache slot of each new token
    query_start_loc: torch.Tensor  # [S+1] int32
    seq_lens: torch.Tensor  # [S] int32, context length after this step
    block_tables: torch.Tensor  # [S, MB] int32
    max_query_len: int  # host ints: the longest new-token chunk and context of the step
    max_seq_len: int


class Transformer:
    """Holds the weights (engine layout, see checkpoint.load_weights) and runs a forward pass."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], max_positions: int, ops: Ops,
                 tp: "TensorParallel | None" = None) -> None:
        """``tp``: this rank's group under tensor parallelism (``config`` and ``weights`` are then
        the rank's shard, engine/sharding.py); None runs the whole model here."""
        self.config = config
        self.ops = ops
        self.tp = tp
        self.w = weights
        embed = weights["embed"]
        self.device, self.dtype = embed.device, embed.dtype
        self.rotary = RotaryCache(config.head_dim, config.rope_theta, config.rope_scaling,
                                  max_positions, self.device, self.dtype)
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim ** -0.5

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attn: AttentionMetadata, lora: LoRABatch, pool: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids: [T]; pool: [P, L, PAGE] unified page pool; kv_caches: per layer (K, V) views of
        it, each [P, BS, KVH, D]; logits_indices: [N] -> logits [N, V] float32 (under tensor
        parallelism: on rank 0, and None on the others)."""
        c, w, ops, tp = self.config, self.w, self.ops, self.tp
        num_tokens = input_ids.shape[0]
        if tp is None:
            hidden = w["embed"].index_select(0, input_ids)  # [T, H]
        else:
            hidden = tp.embed(w["embed"], input_ids)
        cos, sin = self.rotary.lookup(attn.positions)
        residual = None
        # each projection's LoRA delta (or None, LoRABatch.linear) goes to the op that reads its output;
        # a row-parallel projection's LoRA must be in its all-reduce, so under tensor parallelism it is not deferred
        defer_rows = tp is None
        down_delta = None
        for i in range(c.num_layers):
            hidden, residual = ops.add_rms_norm(hidden, residual, w[f"{i}.input_norm"], c.rms_norm_eps, down_delta)
            # attention block
            qkv, delta = lora.linear(ops, hidden, w[f"{i}.qkv"], w.get(f"{i}.qkv_bias"), pool, i, "qkv")  # [T, q + 2kv]
            k_cache, v_cache = kv_caches[i]
            q = ops.rotary_and_write_kv(qkv, cos, sin, self.q_size, self.kv_size, c.num_heads, c.num_kv_heads,
                                        c.head_dim, k_cache, v_cache, attn.slot_mapping, delta)  # [T, heads, D]
            out = ops.attention(q, k_cache, v_cache, attn, self.scale, c.sliding_window)
            out = out.reshape(num_tokens, self.q_size)
            o, delta = lora.linear(ops, out, w[f"{i}.o"], w.get(f"{i}.o_bias"), pool, i, "o", defer_rows)
            if tp is not None:
                tp.all_reduce(o)
            hidden, residual = ops.add_rms_norm(o, residual, w[f"{i}.post_norm"], c.rms_norm_eps, delta)
            # MLP block
            gate_up, delta = lora.linear(ops, hidden, w[f"{i}.gate_up"], w.get(f"{i}.gate_up_bias"), pool, i,
                                         "gate_up")  # [T, 2I]
            act = ops.silu_and_mul(gate_up, delta)  # [T, I]
            hidden, down_delta = lora.linear(ops, act, w[f"{i}.down"], w.get(f"{i}.down_bias"), pool, i, "down",
                                             defer_rows)
            if tp is not None:
                tp.all_reduce(hidden)
        hidden, _ = ops.add_rms_norm(hidden, residual, w["norm"], c.rms_norm_eps, down_delta)
        hidden = hidden.index_select(0, logits_indices)
        logits = ops.linear(hidden, w["lm_head"], None).float()
        return logits if tp is None else tp.gather_logits(logits)
