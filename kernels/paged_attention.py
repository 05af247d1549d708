"""Paged decode attention (one new token per sequence) and the attention dispatcher.

Decode grid: (sequence, KV head, context split). A program serves all GROUP = H / KVH query
heads of its KV head at once (their rows padded to 16 for tl.dot), so each K/V byte is read
once. When sequences x KV heads cannot fill the GPU, each sequence's context is cut into
num_splits parts (flash-decoding) and a second kernel merges the partial softmaxes.
Twin: kernels.reference.paged_attention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import tiles
from kernels.attention_args import check_attention_args, check_out
from kernels.attention_common import LOG2E, load_paged_rows, softmax_rescale
from kernels.launch import pdl_start, pdl_supported
from kernels.prefill_attention import prefill_attention



# bt_stride_s (the step's longest block table) is not specialized: one binary for every step
@triton.jit(do_not_specialize=["bt_stride_s"])
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale, window,  # qk_scale = scale * log2(e); window 0 = no sliding window
    q_stride_t, q_stride_h, k_stride_b, k_stride_s, k_stride_h, v_stride_b, v_stride_s, v_stride_h,
    bt_stride_s, out_stride_t, out_stride_h,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)  # q and the cache are read only once the kernel before (rotary and the KV write) is done
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    tok = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == tok:
        return
    ctx = tl.load(seq_lens_ptr + seq)
    start = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)  # first visible key
    lo = (start // BLOCK_N) * BLOCK_N
    chunks_per_split = tl.cdiv(tl.cdiv(ctx - lo, BLOCK_N), NUM_SPLITS)
    split_lo = lo + split * chunks_per_split * BLOCK_N
    split_hi = tl.minimum(split_lo + chunks_per_split * BLOCK_N, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + tok.to(tl.int64) * q_stride_t + heads[:, None] * q_stride_h + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    bt_row = block_tables_ptr + seq.to(tl.int64) * bt_stride_s
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for n0 in range(split_lo, split_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_in = offs_n < split_hi
        block = tl.load(bt_row + offs_n // BS, mask=n_in, other=0).to(tl.int64)
        in_block = offs_n % BS
        kv_mask = n_in[:, None] & d_mask[None, :]
        k = load_paged_rows(k_ptr, block, in_block, kv_head, k_stride_b, k_stride_s, k_stride_h, offs_d,
                            kv_mask)  # [BLOCK_N, BLOCK_D]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        qk = tl.where((n_in & (offs_n >= start))[None, :], qk, float("-inf"))
        p, alpha, m_new, l_i = softmax_rescale(qk, m_i, l_i)
        v = load_paged_rows(v_ptr, block, in_block, kv_head, v_stride_b, v_stride_s, v_stride_h, offs_d,
                            kv_mask)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + tok.to(tl.int64) * out_stride_t + heads[:, None] * out_stride_h + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        part = (seq * NUM_HEADS + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_m_ptr + part, m_i, mask=g_mask)
        tl.store(part_l_ptr + part, l_i, mask=g_mask)
        tl.store(part_acc_ptr + part[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], acc,
                 mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, query_start_loc_ptr,
    out_stride_t, out_stride_h,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    tok = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == tok:
        return
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    part = (seq * NUM_HEADS + head) * NUM_SPLITS + offs_s  # [BLOCK_S]
    m = tl.load(part_m_ptr + part, mask=s_mask, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    acc = tl.load(part_acc_ptr + part[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
                  mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + tok.to(tl.int64) * out_stride_t + head * out_stride_h + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                           scale: float, sliding_window: int | None = None, *, max_seq_len: int | None = None,
                           config: tiles.DecodeAttentionTiles | None = None,
                           out: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """Attention of each sequence's one new token over its paged context. Returns [T, H, D].

    q: [T, H, D], unit stride along D; sequence s's token is q[query_start_loc[s]] (none if
       query_start_loc[s+1] == query_start_loc[s]); every sequence has at most one new token
    k_cache, v_cache: [NB, BS, KVH, D] views (page stride free, e.g. the pool's per-layer view),
       already holding the new token's K/V
    block_tables: [S, MB] int32; seq_lens: [S] int32 context length including the new token
    query_start_loc: [S+1] int32
    scale: softmax scale; sliding_window: keys within the last sliding_window positions, or None
    max_seq_len: host bound on seq_lens (sizes the split count; default MB * BS)
    config: tile override (tests, benchmarks); default from kernels.tiles
    out: [T, H, D] like q, unit stride along D, to write into (default: a new tensor)
    pdl: launch with programmatic dependent launch where the device has it (kernels/launch.py)
    """
    check_attention_args("paged_decode_attention", q, k_cache, v_cache, block_tables, seq_lens,
                         query_start_loc, sliding_window)
    num_tokens, num_heads, head_dim = q.shape
    out = check_out(out, q)  # [T, H, D]
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    on_gpu = q.device.type == "cuda"
    if config is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if on_gpu else 1
        bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
        config = tiles.decode_attention_tiles(num_seqs, num_kv_heads, bound, head_dim, num_sms, on_gpu)
    num_splits = config.num_splits
    if num_splits > 1:
        part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    block_d = max(tiles.MIN_DOT, tiles.next_pow2(head_dim))
    pdl = pdl and pdl_supported(q.device)
    _decode_attention_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_acc, part_m, part_l,
        block_tables, seq_lens, query_start_loc,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, BS=block_size, NUM_SPLITS=num_splits,
        BLOCK_G=max(tiles.MIN_DOT, tiles.next_pow2(group)), BLOCK_D=block_d, BLOCK_N=config.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            out, part_acc, part_m, part_l, query_start_loc, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            BLOCK_S=tiles.next_pow2(num_splits), BLOCK_D=block_d, num_warps=4 if on_gpu else 1,
        )
    return out


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
              seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, sliding_window: int | None,
              max_query_len: int, *, max_seq_len: int | None = None,
              out: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """Causal paged attention of a step's new tokens: decode kernel when every sequence brings one
    token (max_query_len == 1), else the prefill kernel (which also serves decode rows mixed
    into a prefill step). Shapes as kernels.reference.paged_attention; max_query_len is a host
    int (the step's longest chunk); max_seq_len an optional host bound on seq_lens; out an
    optional [T, H, D] buffer; pdl: the decode kernel launched with programmatic dependent launch
    where the device has it. Returns [T, H, D]."""
    if max_query_len <= 1:
        return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                      sliding_window, max_seq_len=max_seq_len, out=out, pdl=pdl)
    return prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                             sliding_window, max_query_len=max_query_len, out=out)
