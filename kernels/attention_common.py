"""What the decode and prefill attention kernels share: reading a block of paged K/V rows, and
one step of the online softmax (FlashAttention-2 style, in base 2).

A key at context position n lives in page block_tables[s, n // BS], row n % BS, of the K/V cache
views [NB, BS, KVH, D] (any page stride: they are views into the unified pool).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the kernels take scale * log2(e) and use exp2


@triton.jit
def load_paged_rows(cache_ptr, block, in_block, kv_head, stride_b, stride_s, stride_h, offs_d, mask):
    """[BLOCK_N, BLOCK_D] rows of one KV head; block: [BLOCK_N] int64 pages, in_block: [BLOCK_N] rows."""
    return tl.load(cache_ptr + (block * stride_b + in_block * stride_s + kv_head * stride_h)[:, None]
                   + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def softmax_rescale(qk, m_i, l_i):
    """Fold a block of scores qk [ROWS, BLOCK_N] (base-2 logits, -inf where hidden) into the running
    max m_i and sum l_i [ROWS]. Returns (p, alpha, m_new, l_new): the block's weights and the factor
    by which the accumulator is rescaled (acc * alpha[:, None] + p @ V)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)
