"""Fused LoRA: y[t, off_p : off_p + N_p] += scale_p * (x[t] A_p^T) B_p^T, one launch per projection group.

Work items are (tile, projection, column range). A tile is up to BLOCK_M tokens of one adapter
(LoRAStepMeta): its item computes z = x_tile A_p^T over the whole K in registers (no z buffer, no
zeroing, no second launch), then adds scale_p * z B_p^T into its range of projection p's columns.
The grid is a fixed number of programs (about 2 per SM, kernels/tiles.py) that share the items.
How many tiles have an adapter is known only on the device (meta.num_lora_tiles), so the column
split is chosen there: as many ranges per (tile, projection) as fill the programs, up to
max_split, since each range reads the tile's x rows and A_p again. One adapter's step spreads its
B^T over the GPU; 64 adapters' steps take one or two ranges each. The same binary serves any mix
(and a CUDA graph captured once serves every step of its bucket). Tiles of tokens without an
adapter come last in the tile list and no program visits them. Each output element is written by
one program, without atomics: results do not depend on the split.
Twin: kernels.reference.lora_fused (reference.lora_shrink, then reference.lora_expand).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import tiles
from kernels.lora_common import (check_lora_args, check_output, expand_n_loop, loop_pages, shrink_k_loop, sm_count,
                                 step_meta, vec_width)
from kernels.lora_meta import LoRAStepMeta

# projections per launch; the launcher splits larger groups
MAX_PROJ = 4


@triton.jit
def _fused_item(x_ptr, pool_ptr, y_ptr, tok, m_mask, slot, proj, rank, n_size, y_offset, n_lo, n_hi,
                page_tables_ptr, a_offsets_ptr, b_offsets_ptr, scales_ptr, K, num_pages, layer_offset, page_stride,
                x_stride_t, y_stride_t, pt_stride_s,
                NPROJ: tl.constexpr, PAGE: tl.constexpr, VEC_A: tl.constexpr, VEC_B: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                A_IN_TWO_PAGES: tl.constexpr, B_IN_TWO_PAGES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One work item: z = x[tok] A_p^T over the whole K (BLOCK_R >= rank), then
    y[tok, n_lo:n_hi] += scale z B_p^T."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    page_table_ptr = page_tables_ptr + slot * pt_stride_s
    a_offset = tl.load(a_offsets_ptr + slot * NPROJ + proj).to(tl.int32)
    a_rows = a_offset + offs_r * K  # [BLOCK_R] virtual start of each A row
    z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if a_offset % VEC_A == 0:  # 16-byte loads need the adapter's rows aligned, checked per slot
        z = shrink_k_loop(z, x_ptr, pool_ptr, tok, m_mask, x_stride_t, page_table_ptr, num_pages, a_rows,
                          r_mask, page_stride, layer_offset, K, 0, K,
                          PAGE, VEC_A, BLOCK_K, A_IN_TWO_PAGES, DOT_PRECISION)
    else:
        z = shrink_k_loop(z, x_ptr, pool_ptr, tok, m_mask, x_stride_t, page_table_ptr, num_pages, a_rows,
                          r_mask, page_stride, layer_offset, K, 0, K,
                          PAGE, 1, BLOCK_K, A_IN_TWO_PAGES, DOT_PRECISION)
    zt = z.to(pool_ptr.dtype.element_ty)  # rounded as lora_expand rounds the z it reads
    y_rows = tok * y_stride_t + y_offset  # [BLOCK_M]
    b_offset = tl.load(b_offsets_ptr + slot * NPROJ + proj).to(tl.int32)
    scale = tl.load(scales_ptr + slot * NPROJ + proj)
    b_rows = b_offset + offs_r * n_size  # [BLOCK_R] virtual start of each B^T row
    in_page, first, second = loop_pages(page_table_ptr, num_pages, b_rows, n_size, r_mask, page_stride, PAGE,
                                        B_IN_TWO_PAGES)
    if b_offset % VEC_B == 0:
        expand_n_loop(zt, pool_ptr, y_ptr, y_rows, m_mask, page_table_ptr, num_pages, b_rows, r_mask, n_size,
                      in_page, first, second, n_lo, n_hi, scale, page_stride, layer_offset,
                      PAGE, VEC_B, BLOCK_N, B_IN_TWO_PAGES, DOT_PRECISION)
    else:
        expand_n_loop(zt, pool_ptr, y_ptr, y_rows, m_mask, page_table_ptr, num_pages, b_rows, r_mask, n_size,
                      in_page, first, second, n_lo, n_hi, scale, page_stride, layer_offset,
                      PAGE, 1, BLOCK_N, B_IN_TWO_PAGES, DOT_PRECISION)


# Arguments that vary from step to step are not specialized (kernels/tiles.py: compile keys), so
# one binary serves every rank up to BLOCK_R, every adapter size and every column split.
@triton.jit(do_not_specialize=["max_split", "num_pages", "pt_stride_s"])
def _lora_fused_kernel(
    x_ptr, pool_ptr, y_ptr,
    sorted_ids_ptr, tile_starts_ptr, tile_lens_ptr, tile_slots_ptr, num_lora_tiles_ptr,
    page_tables_ptr, ranks_ptr, a_offsets_ptr, b_offsets_ptr, scales_ptr,
    N0, N1, N2, N3, OFF0, OFF1, OFF2, OFF3,  # column count and y offset of each projection of the launch
    K, max_n, max_split, num_pages, layer_offset, page_stride,
    x_stride_t, y_stride_t, pt_stride_s,
    NPROJ: tl.constexpr, PROJ_BASE: tl.constexpr, NUM_LOCAL: tl.constexpr, PAGE: tl.constexpr,
    VEC_A: tl.constexpr, VEC_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, SMALL_BLOCK_K: tl.constexpr, SMALL_BLOCK_N: tl.constexpr, COL_BLOCK: tl.constexpr,
    A_IN_TWO_PAGES: tl.constexpr, B_IN_TWO_PAGES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    num_programs = tl.num_programs(0)
    pairs = tl.load(num_lora_tiles_ptr) * NUM_LOCAL  # (tile, projection) pairs with work
    # column ranges per pair: enough to fill the programs, at most max_split, each a multiple of
    # COL_BLOCK (= both paths' BLOCK_N)
    splits = tl.minimum(tl.maximum(num_programs // tl.maximum(pairs, 1), 1), max_split)
    cols_per_item = tl.cdiv(tl.cdiv(max_n, COL_BLOCK), splits) * COL_BLOCK
    splits = tl.cdiv(max_n, cols_per_item)
    offs_m = tl.arange(0, BLOCK_M)
    # the column ranges of one pair are consecutive items, so they run together and share x and A_p in L2
    for item in range(tl.program_id(0), pairs * splits, num_programs):
        pair = item // splits
        local_proj = pair % NUM_LOCAL
        tile = pair // NUM_LOCAL
        proj = PROJ_BASE + local_proj  # index into the [NS, NPROJ] tables
        n_size = tl.where(local_proj == 0, N0, tl.where(local_proj == 1, N1, tl.where(local_proj == 2, N2, N3)))
        slot = tl.load(tile_slots_ptr + tile)  # >= 0: tiles with an adapter come first
        rank = tl.load(ranks_ptr + slot * NPROJ + proj)
        n_lo = (item % splits) * cols_per_item
        if (rank > 0) & (n_lo < n_size):  # rank 0: the adapter lacks this module; ranges past a short projection
            n_hi = tl.minimum(n_lo + cols_per_item, n_size)
            y_offset = tl.where(local_proj == 0, OFF0,
                                tl.where(local_proj == 1, OFF1, tl.where(local_proj == 2, OFF2, OFF3)))
            m_mask = offs_m < tl.load(tile_lens_ptr + tile)
            tok = tl.load(sorted_ids_ptr + tl.load(tile_starts_ptr + tile) + offs_m, mask=m_mask,
                          other=0).to(tl.int64)  # [BLOCK_M]
            # ranks up to 16 in a wider kernel (decode graphs take BLOCK_R from max_lora_rank) take a
            # 16-row path with its own, longer pieces: masked rows fetch nothing, but they would
            # shorten the bytes in flight per step
            small = False
            if BLOCK_R > 16:
                small = rank <= 16
            if small:
                _fused_item(x_ptr, pool_ptr, y_ptr, tok, m_mask, slot, proj, rank, n_size, y_offset, n_lo, n_hi,
                            page_tables_ptr, a_offsets_ptr, b_offsets_ptr, scales_ptr, K, num_pages, layer_offset,
                            page_stride, x_stride_t, y_stride_t, pt_stride_s,
                            NPROJ, PAGE, VEC_A, VEC_B, BLOCK_M, SMALL_BLOCK_K, SMALL_BLOCK_N, 16,
                            A_IN_TWO_PAGES, B_IN_TWO_PAGES, DOT_PRECISION)
            else:
                _fused_item(x_ptr, pool_ptr, y_ptr, tok, m_mask, slot, proj, rank, n_size, y_offset, n_lo, n_hi,
                            page_tables_ptr, a_offsets_ptr, b_offsets_ptr, scales_ptr, K, num_pages, layer_offset,
                            page_stride, x_stride_t, y_stride_t, pt_stride_s,
                            NPROJ, PAGE, VEC_A, VEC_B, BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R,
                            A_IN_TWO_PAGES, B_IN_TWO_PAGES, DOT_PRECISION)


def lora_fused(x: torch.Tensor, pool: torch.Tensor, layer: int, token_slots: torch.Tensor,
               page_tables: torch.Tensor, ranks: torch.Tensor, a_offsets: torch.Tensor, b_offsets: torch.Tensor,
               scales: torch.Tensor, y: torch.Tensor, out_offsets: list[int], out_sizes: list[int], max_rank: int, *,
               meta: LoRAStepMeta | None = None, config: tiles.FusedTiles | None = None) -> None:
    """y[t, off_p : off_p + N_p] += scale_p * (x[t] A_p^T) B_p^T for every token with an adapter, in place.

    x: [T, K] fp16/bf16/fp32, unit stride along K, same dtype as pool
    pool: [P, L, PAGE] contiguous; adapter elements at pool[page_tables[s, v // PAGE], layer, v % PAGE]
    layer: 0 <= layer < L
    token_slots: [T] int32 adapter slot per token, -1 = none (such tokens' rows of y are untouched)
    page_tables: [NS, MP] int32, each slot's pages in order
    ranks: [NS, NPROJ] int32, 0 = module absent; every rank <= max_rank
    a_offsets: [NS, NPROJ] int64, virtual offset of A_p ([r, K] row-major); offsets < 2**31
    b_offsets: [NS, NPROJ] int64, virtual offset of B_p^T ([r, N_p] row-major)
    scales: [NS, NPROJ] float32
    y: [T, N_total] same dtype as x, unit stride along N
    out_offsets, out_sizes: [NPROJ] host ints, where each projection's output sits in y
    max_rank: host int, 1 <= max_rank <= 256, a bound on every rank (R_MAX of the split kernels' z)
    meta: the step's LoRAStepMeta (built here when None; build it once per step instead)
    config: tile override (tests, benchmarks); default from kernels.tiles
    """
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"lora_fused: x must be [T, K] with unit stride along K, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")
    num_tokens, k = x.shape
    num_slots, num_pages = page_tables.shape if page_tables.dim() == 2 else (0, 0)
    num_proj = len(out_sizes)
    check_lora_args("lora_fused", pool, layer, token_slots, page_tables, ranks,
                    {"a_offsets": a_offsets, "b_offsets": b_offsets}, num_tokens, num_proj)
    check_output("lora_fused", y, pool, scales, num_slots, num_proj, out_offsets, out_sizes)
    if x.dtype != pool.dtype or x.device != pool.device:
        raise ValueError(f"lora_fused: x is {x.dtype} on {x.device}, pool is {pool.dtype} on {pool.device}")
    if y.shape[0] != num_tokens:
        raise ValueError(f"lora_fused: y has {y.shape[0]} rows, x {num_tokens}")
    if not 1 <= max_rank <= tiles.MAX_RANK:
        raise ValueError(f"lora_fused: max_rank = {max_rank} must be in [1, {tiles.MAX_RANK}]")
    if num_tokens == 0:
        return
    page_size = pool.shape[2]
    meta = step_meta(meta, token_slots, num_slots)
    max_n = max(out_sizes)
    if config is None:
        config = tiles.fused_tiles(meta.max_tiles, k, max_n, num_proj, max_rank, page_size, meta.block_m,
                                   sm_count(pool.device), pool.device.type == "cuda")
    a_in_two_pages, b_in_two_pages = k <= page_size, max_n <= page_size
    if ((not a_in_two_pages and max(config.block_k, config.small_block_k) > page_size)
            or (not b_in_two_pages and max(config.block_n, config.small_block_n) > page_size)):
        raise ValueError(f"lora_fused: the tiles {config} exceed the page size {page_size} (rows of K = {k} / "
                         f"N = {max_n} are read in page-sized pieces)")
    for base in range(0, num_proj, MAX_PROJ):
        sizes = list(out_sizes[base:base + MAX_PROJ])
        offsets = list(out_offsets[base:base + MAX_PROJ])
        count = len(sizes)
        _lora_fused_kernel[(config.num_programs,)](
            x, pool, y,
            meta.sorted_token_ids, meta.tile_starts, meta.tile_lens, meta.tile_slots, meta.num_lora_tiles,
            page_tables, ranks, a_offsets, b_offsets, scales,
            *(sizes + [0] * (MAX_PROJ - count)), *(offsets + [0] * (MAX_PROJ - count)),
            k, max(sizes), config.max_split, num_pages, layer * page_size, pool.stride(0),
            x.stride(0), y.stride(0), page_tables.stride(0),
            NPROJ=num_proj, PROJ_BASE=base, NUM_LOCAL=count, PAGE=page_size, VEC_A=vec_width(k, page_size),
            VEC_B=vec_width(page_size, *sizes), BLOCK_M=meta.block_m, BLOCK_K=config.block_k,
            BLOCK_N=config.block_n, BLOCK_R=tiles.expand_block_r(max_rank), SMALL_BLOCK_K=config.small_block_k,
            SMALL_BLOCK_N=config.small_block_n, COL_BLOCK=max(config.block_n, config.small_block_n),
            A_IN_TWO_PAGES=a_in_two_pages,
            B_IN_TWO_PAGES=b_in_two_pages, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
