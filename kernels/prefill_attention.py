"""Causal attention of variable-length chunks of new tokens over the paged KV cache (chunked prefill).

Grid: (query block, query head, sequence). Sequence s brings q_len = query_start_loc[s+1] -
query_start_loc[s] new tokens, the i-th at position seq_len - q_len + i (so a chunk may start
past 0: its earlier context is read from the cache, where the new tokens' K/V already are).
Each program streams the keys its BLOCK_M queries can see with an online softmax
(FlashAttention-2 style). Twin: kernels.reference.paged_attention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import tiles
from kernels.attention_args import check_attention_args, check_out
from kernels.attention_common import LOG2E, load_paged_rows, softmax_rescale



# bt_stride_s (the step's longest block table) is not specialized: one binary for every step
@triton.jit(do_not_specialize=["bt_stride_s"])
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale, window,  # qk_scale = scale * log2(e); window 0 = no sliding window
    q_stride_t, q_stride_h, k_stride_b, k_stride_s, k_stride_h, v_stride_b, v_stride_s, v_stride_h,
    bt_stride_s, out_stride_t, out_stride_h,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    m0 = m_block * BLOCK_M
    if m0 >= q_len:
        return
    ctx = tl.load(seq_lens_ptr + seq)
    prefix = ctx - q_len  # context before this chunk
    kv_head = head // GROUP

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    q_pos = prefix + offs_m  # [BLOCK_M]
    window_lo = tl.where(window > 0, q_pos - window, -1)  # keys must lie above this
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * q_stride_t + head * q_stride_h + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    bt_row = block_tables_ptr + seq.to(tl.int64) * bt_stride_s
    hi = tl.minimum(ctx, prefix + m0 + BLOCK_M)  # causal: the block's last query sees up to here
    lo = tl.where(window > 0, tl.maximum(prefix + m0 - window + 1, 0), 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_in = offs_n < hi
        block = tl.load(bt_row + offs_n // BS, mask=n_in, other=0).to(tl.int64)
        in_block = offs_n % BS
        kv_mask = n_in[:, None] & d_mask[None, :]
        k = load_paged_rows(k_ptr, block, in_block, kv_head, k_stride_b, k_stride_s, k_stride_h, offs_d,
                            kv_mask)  # [BLOCK_N, BLOCK_D]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] > window_lo[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        p, alpha, m_new, l_i = softmax_rescale(qk, m_i, l_i)
        v = load_paged_rows(v_ptr, block, in_block, kv_head, v_stride_b, v_stride_s, v_stride_h, offs_d,
                            kv_mask)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + rows[:, None] * out_stride_t + head * out_stride_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                      scale: float, sliding_window: int | None = None, *, max_query_len: int | None = None,
                      config: tiles.PrefillAttentionTiles | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context. Returns [T, H, D].

    q: [T, H, D], unit stride along D; sequence s's tokens are q[query_start_loc[s]:query_start_loc[s+1]]
    k_cache, v_cache: [NB, BS, KVH, D] views (page stride free), already holding the new tokens' K/V
    block_tables: [S, MB] int32; seq_lens: [S] int32 context length including the new tokens
    query_start_loc: [S+1] int32
    scale: softmax scale; sliding_window: keys within the last sliding_window positions, or None
    max_query_len: host int, the longest chunk (sizes the grid); computed with a device sync if None
    config: tile override (tests, benchmarks); default from kernels.tiles
    out: [T, H, D] like q, unit stride along D, to write into (default: a new tensor)
    """
    check_attention_args("prefill_attention", q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                         sliding_window)
    num_tokens, num_heads, head_dim = q.shape
    out = check_out(out, q)  # [T, H, D]
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if config is None:
        config = tiles.prefill_attention_tiles(head_dim, q.device.type == "cuda")
    grid = (tiles.cdiv(max_query_len, config.block_m), num_heads, num_seqs)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, out,
        block_tables, seq_lens, query_start_loc,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BS=block_size,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=max(tiles.MIN_DOT, tiles.next_pow2(head_dim)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
