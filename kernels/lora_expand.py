"""LoRA expand: y[t, off_p : off_p + N_p] += scale_p * z[t, p, :r] B_p^T, NPROJ projections per launch;
or, with accumulate=False, y[t, off_p : off_p + N_p] = scale_p * z[t, p, :r] B_p^T for every token (zeros
for a module the adapter lacks and for tokens without an adapter), a LoRA delta that the op after the
projection or the base GEMM adds (engine/lora_batch.py).

Grid: (tile, column range, projection). A tile is up to BLOCK_M tokens of one adapter
(LoRAStepMeta); its program loads the tokens' z once (BLOCK_R >= R_MAX columns, masked by the
adapter's own rank, so adapters of different ranks share one launch) and walks its column range
in BLOCK_N steps. Twin: kernels.reference.lora_expand.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import tiles
from kernels.launch import gdc_wait, pdl_supported
from kernels.lora_common import (check_lora_args, check_output, check_z, expand_n_loop, loop_pages, sm_count, step_meta,
                                 vec_width)
from kernels.lora_meta import LoRAStepMeta

# projections per launch; the launcher splits larger groups
MAX_PROJ = 4


# Arguments that vary from step to step are not specialized (kernels/tiles.py: compile keys), so
# one binary serves every adapter size and every R_MAX up to BLOCK_R.
@triton.jit(do_not_specialize=["num_pages", "pt_stride_s", "z_stride_t", "z_stride_p"])
def _lora_expand_kernel(
    z_ptr, pool_ptr, y_ptr, z_next_ptr,
    sorted_ids_ptr, tile_starts_ptr, tile_lens_ptr, tile_slots_ptr,
    page_tables_ptr, ranks_ptr, b_offsets_ptr, scales_ptr,
    N0, N1, N2, N3, OFF0, OFF1, OFF2, OFF3,  # column count and y offset of each projection
    cols_per_program, num_pages, layer_offset, page_stride,
    y_stride_t, pt_stride_s, z_stride_t, z_stride_p,
    NPROJ: tl.constexpr, PROJ_BASE: tl.constexpr, PAGE: tl.constexpr, VEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ROW_IN_TWO_PAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr, ZERO_NEXT: tl.constexpr, WAIT_PRIOR: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    local_proj = tl.program_id(2)
    proj = PROJ_BASE + local_proj  # index into the [NS, NPROJ] tables and z
    n_size = tl.where(local_proj == 0, N0, tl.where(local_proj == 1, N1, tl.where(local_proj == 2, N2, N3)))
    y_offset = tl.where(local_proj == 0, OFF0, tl.where(local_proj == 1, OFF1, tl.where(local_proj == 2, OFF2, OFF3)))
    tile_len = tl.load(tile_lens_ptr + pid_tile)
    slot = tl.load(tile_slots_ptr + pid_tile)
    rank = tl.load(ranks_ptr + slot * NPROJ + proj, mask=slot >= 0, other=0)
    n_lo = pid_n * cols_per_program
    # storing, a module the adapter lacks (rank 0) and a token without an adapter (slot -1, rank 0) get zeros
    if (tile_len == 0) | (((slot < 0) | (rank == 0)) & ACCUMULATE) | (n_lo >= n_size):
        return
    n_hi = tl.minimum(n_lo + cols_per_program, n_size)

    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < tile_len
    tok = tl.load(sorted_ids_ptr + tl.load(tile_starts_ptr + pid_tile) + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)  # BLOCK_R >= R_MAX: the whole rank in one step, masked by this slot's rank
    r_mask = offs_r < rank
    b_offset = tl.load(b_offsets_ptr + slot * NPROJ + proj, mask=slot >= 0, other=0).to(tl.int32)
    scale = tl.load(scales_ptr + slot * NPROJ + proj, mask=slot >= 0, other=0.0)
    row_start = b_offset + offs_r * n_size  # [BLOCK_R] virtual start of each B^T row
    page_table_ptr = page_tables_ptr + tl.maximum(slot, 0) * pt_stride_s  # rank 0: its loads are all masked
    in_page, first, second = loop_pages(page_table_ptr, num_pages, row_start, n_size, r_mask, page_stride, PAGE,
                                        ROW_IN_TWO_PAGES)
    if WAIT_PRIOR:
        # launched early (programmatic dependent launch): what is read above are the step's tables, written
        # before the kernel before this one (the shrink) began; z (that shrink's output) and y are read,
        # and anything written, only once that kernel has finished and its writes are visible
        gdc_wait()
    z_offs = (tok * z_stride_t + proj * z_stride_p)[:, None] + offs_r[None, :]
    z_mask = m_mask[:, None] & r_mask[None, :]
    zt = tl.load(z_ptr + z_offs, mask=z_mask, other=0.0)  # [BLOCK_M, BLOCK_R] fp32
    if ZERO_NEXT:  # the next layer's shrink accumulates into z_next without a memset
        if pid_n == 0:
            tl.store(z_next_ptr + z_offs, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), mask=z_mask)
    zt = zt.to(pool_ptr.dtype.element_ty)
    y_rows = tok * y_stride_t + y_offset  # [BLOCK_M]
    if b_offset % VEC == 0:  # 16-byte loads need the adapter's rows aligned, checked per slot
        expand_n_loop(zt, pool_ptr, y_ptr, y_rows, m_mask, page_table_ptr, num_pages, row_start, r_mask, n_size,
                      in_page, first, second, n_lo, n_hi, scale, page_stride, layer_offset,
                      PAGE, VEC, BLOCK_N, ROW_IN_TWO_PAGES, DOT_PRECISION, ACCUMULATE)
    else:
        expand_n_loop(zt, pool_ptr, y_ptr, y_rows, m_mask, page_table_ptr, num_pages, row_start, r_mask, n_size,
                      in_page, first, second, n_lo, n_hi, scale, page_stride, layer_offset,
                      PAGE, 1, BLOCK_N, ROW_IN_TWO_PAGES, DOT_PRECISION, ACCUMULATE)

def lora_expand(z: torch.Tensor, pool: torch.Tensor, layer: int, token_slots: torch.Tensor,
                page_tables: torch.Tensor, ranks: torch.Tensor, b_offsets: torch.Tensor, scales: torch.Tensor,
                y: torch.Tensor, out_offsets: list[int], out_sizes: list[int], *,
                meta: LoRAStepMeta | None = None, config: tiles.ExpandTiles | None = None,
                accumulate: bool = True, zero_after: torch.Tensor | None = None, pdl: bool = False) -> None:
    """y[t, off_p : off_p + N_p] += scale_p * z[t, p, :r] B_p^T for every token with an adapter, in place.

    z: [T, NPROJ, R_MAX] float32 contiguous, from lora_shrink
    pool: [P, L, PAGE] contiguous, same dtype as y
    layer: 0 <= layer < L
    token_slots: [T] int32 adapter slot per token, -1 = none (such tokens' rows of y are untouched when accumulating)
    page_tables: [NS, MP] int32, each slot's pages in order
    ranks: [NS, NPROJ] int32, 0 = module absent; every rank <= R_MAX <= 256
    b_offsets: [NS, NPROJ] int64, virtual offset of B_p^T ([r, N_p] row-major); offsets < 2**31
    scales: [NS, NPROJ] float32
    y: [T, N_total] fp16/bf16/fp32, unit stride along N
    out_offsets, out_sizes: [NPROJ] host ints, where each projection's output sits in y
    meta: the step's LoRAStepMeta (built here when None; build it once per step instead)
    config: tile override (tests, benchmarks); default from kernels.tiles
    accumulate: False stores scale_p * z B_p^T instead (y is not read), in the projections' columns of
    every row: zeros for a projection of rank 0 and for tokens without an adapter (y may start uninitialised);
    other columns are untouched
    zero_after: a tensor like z (another layer's z buffer) whose entries z[t, p, :r] this launch reads are
    set to zero in it (tokens with an adapter, projections of rank r > 0; the rest untouched), so that
    the next lora_shrink into it may skip its memset (z_zeroed)
    pdl: the kernel just before this one in its stream is the lora_shrink that wrote z, and no kernel
    since the tables (meta, page_tables, ranks, b_offsets, scales) and the pool were written has been
    launched with pdl. Then, on a device that has it (kernels/launch.py), the launch is a
    programmatic dependent launch: the programs start while the shrink runs (it lets them at its
    start), gather the tables and page ids, and wait for the shrink's end before they read z or y or
    write anything
    """
    num_tokens = y.shape[0]
    check_z("lora_expand", z, num_tokens, pool.device)
    num_slots, num_pages = page_tables.shape
    num_proj, r_max = z.shape[1], z.shape[2]
    check_lora_args("lora_expand", pool, layer, token_slots, page_tables, ranks, {"b_offsets": b_offsets},
                    num_tokens, num_proj)
    check_output("lora_expand", y, pool, scales, num_slots, num_proj, out_offsets, out_sizes)
    if zero_after is not None and (zero_after.shape != z.shape or zero_after.stride() != z.stride()
                                   or zero_after.dtype != z.dtype or zero_after.device != z.device
                                   or (z.numel() and zero_after.data_ptr() == z.data_ptr())):
        raise ValueError(f"lora_expand: zero_after must be another tensor like z {tuple(z.shape)} float32, got "
                         f"{zero_after.dtype} {tuple(zero_after.shape)}")
    if r_max > tiles.MAX_RANK:
        raise ValueError(f"lora_expand: R_MAX = {r_max} > {tiles.MAX_RANK} is not supported")
    if num_tokens == 0:
        return
    page_size = pool.shape[2]
    on_gpu = pool.device.type == "cuda"
    meta = step_meta(meta, token_slots, num_slots)
    if config is None:
        config = tiles.expand_tiles(meta.max_tiles, max(out_sizes), num_proj, page_size, meta.block_m,
                                    sm_count(pool.device), on_gpu, accumulate)
    block_r = tiles.expand_block_r(r_max)
    row_in_two_pages = max(out_sizes) <= page_size
    if not row_in_two_pages and config.block_n > page_size:
        raise ValueError(f"lora_expand: block_n {config.block_n} exceeds the page size {page_size} (rows of "
                         f"N = {max(out_sizes)} are read in page-sized pieces)")
    cols_per_program = config.block_n * config.chunks_per_program
    pdl = pdl and pdl_supported(pool.device)
    for base in range(0, num_proj, MAX_PROJ):
        early = pdl and base == 0  # a later launch comes after the first, not after the shrink
        sizes = list(out_sizes[base:base + MAX_PROJ])
        offsets = list(out_offsets[base:base + MAX_PROJ])
        count = len(sizes)
        sizes += [0] * (MAX_PROJ - count)
        offsets += [0] * (MAX_PROJ - count)
        grid = (meta.max_tiles, tiles.cdiv(max(sizes), cols_per_program), count)
        _lora_expand_kernel[grid](
            z, pool, y, z if zero_after is None else zero_after,
            meta.sorted_token_ids, meta.tile_starts, meta.tile_lens, meta.tile_slots,
            page_tables, ranks, b_offsets, scales,
            *sizes, *offsets,
            cols_per_program, num_pages, layer * page_size, pool.stride(0),
            y.stride(0), page_tables.stride(0), z.stride(0), z.stride(1),
            NPROJ=num_proj, PROJ_BASE=base, PAGE=page_size, VEC=vec_width(page_size, *out_sizes[base:base + count]),
            BLOCK_M=meta.block_m, BLOCK_N=config.block_n, BLOCK_R=block_r, ROW_IN_TWO_PAGES=row_in_two_pages,
            DOT_PRECISION="ieee" if y.dtype == torch.float32 else "tf32", ACCUMULATE=accumulate,
            ZERO_NEXT=zero_after is not None, WAIT_PRIOR=early,
            num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=early,
        )
