"""Pure-torch reference ops: the CPU path of the engine and the twins the Triton kernels are tested against.

Shapes: T = tokens in the step, S = sequences in the step, H/KVH = query/KV heads, D = head dim,
NB = KV blocks in the cache, BS = block size, MB = max blocks per sequence.
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, H]; computed in float32 like Hugging Face's LlamaRMSNorm
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos, sin: [T, D] (halves repeated, Hugging Face's rotate_half layout)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the step's keys and values into their cache slots.

    k, v: [T, KVH, D]; k_cache, v_cache: [NB, BS, KVH, D]; slot_mapping: [T] = block * BS + offset.
    """
    block_size = k_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, offsets] = k
    v_cache[blocks, offsets] = v


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole context in the paged cache.

    q: [T, H, D], new tokens of S sequences laid end to end (query_start_loc: [S+1]);
    k_cache, v_cache: [NB, BS, KVH, D], already holding the new tokens' K/V;
    block_tables: [S, MB] int; seq_lens: [S] context length including the new tokens.
    The i-th of a sequence's q_len new tokens sits at position seq_len - q_len + i.
    Returns [T, H, D].
    """
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for s, ctx_len in enumerate(lens):
        q_start, q_end = starts[s], starts[s + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = (ctx_len + block_size - 1) // block_size
        blocks = block_tables[s, :num_blocks].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx_len]  # [ctx, KVH, D]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx_len]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, ctx, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qs = q[q_start:q_end].transpose(0, 1)  # [H, q_len, D]
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]
        k_pos = torch.arange(ctx_len, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        scores = torch.matmul(qs.float(), k.float().transpose(1, 2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.matmul(probs, v.float()).transpose(0, 1).to(q.dtype)
    return out


def lora_shrink_expand(y: torch.Tensor, x: torch.Tensor, token_groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]],
                       y_offset: int) -> None:
    """y[:, y_offset:y_offset+N] += scale * (x A^T) B^T for each group of tokens sharing an adapter.

    y: [T, N_total]; x: [T, K]; token_groups: (token_indices [t], A [r, K], B [N, r], scale) per
    adapter present in the step (tokens without an adapter are in no group). Ranks differ per group.
    """
    for token_indices, lora_a, lora_b, scale in token_groups:
        xs = x.index_select(0, token_indices)
        delta = (xs @ lora_a.t()) @ lora_b.t() * scale  # [t, N]
        n = lora_b.shape[0]
        y[:, y_offset:y_offset + n].index_add_(0, token_indices, delta.to(y.dtype))
