"""The op boundary of the model: each op runs a Triton kernel on CUDA or its pure-torch twin.

The Triton-language kernels plug in here; everything else in the engine calls only these.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernels import reference

if TYPE_CHECKING:
    from engine.model import AttentionMetadata


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x, then normalise; returns (normed, new residual)."""
    residual = x if residual is None else residual + x
    return reference.rms_norm(residual, weight, eps), residual


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return reference.apply_rotary(x, cos, sin)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    reference.write_kv(k, v, k_cache, v_cache, slot_mapping)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, attn: "AttentionMetadata",
              scale: float, sliding_window: int | None) -> torch.Tensor:
    return reference.paged_attention(q, k_cache, v_cache, attn.block_tables, attn.seq_lens,
                                     attn.query_start_loc, scale, sliding_window)


def lora_shrink(x, pool, layer, token_slots, page_tables, ranks, a_offsets, z) -> None:
    """z[t, p, :r] = x[t] A_p^T through the adapters' page tables (BGMV/SGMV shrink)."""
    reference.lora_shrink(x, pool, layer, token_slots, page_tables, ranks, a_offsets, z)


def lora_expand(z, pool, layer, token_slots, page_tables, ranks, b_offsets, scales, y, out_offsets, out_sizes) -> None:
    """y[t, off_p:off_p+N_p] += scale_p z[t, p, :r] B_p^T through the page tables (expand)."""
    reference.lora_expand(z, pool, layer, token_slots, page_tables, ranks, b_offsets, scales, y, out_offsets,
                          out_sizes)
