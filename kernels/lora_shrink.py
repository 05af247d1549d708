"""LoRA shrink: z[t, p, :r] = x[t] A_p^T for each token's adapter, NPROJ projections per launch.

Grid: (tile, rank block x K split, projection). A tile is up to BLOCK_M tokens of one adapter
(LoRAStepMeta), so each A row piece is read once per tile: per token for decode (BGMV), once per
BLOCK_M tokens for prefill segments (SGMV). Twin: kernels.reference.lora_shrink.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import tiles
from kernels.launch import gdc_launch_dependents, pdl_supported
from kernels.lora_common import check_lora_args, check_z, shrink_k_loop, sm_count, step_meta, vec_width
from kernels.lora_meta import LoRAStepMeta


# Arguments that vary from step to step are not specialized (kernels/tiles.py: compile keys), so
# one binary serves every rank up to BLOCK_R, every adapter size and every K split.
@triton.jit(do_not_specialize=["R_MAX", "num_pages", "split_k", "pt_stride_s", "z_stride_t", "z_stride_p"])
def _lora_shrink_kernel(
    x_ptr, pool_ptr, z_ptr,
    sorted_ids_ptr, tile_starts_ptr, tile_lens_ptr, tile_slots_ptr,
    page_tables_ptr, ranks_ptr, a_offsets_ptr,
    K, R_MAX, num_pages, layer_offset, page_stride, split_k,
    x_stride_t, pt_stride_s, z_stride_t, z_stride_p,
    NPROJ: tl.constexpr, PAGE: tl.constexpr, VEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ROW_IN_TWO_PAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_r = tl.program_id(1) // split_k
    pid_k = tl.program_id(1) % split_k
    proj = tl.program_id(2)
    tile_len = tl.load(tile_lens_ptr + pid_tile)
    slot = tl.load(tile_slots_ptr + pid_tile)
    rank = tl.load(ranks_ptr + slot * NPROJ + proj, mask=slot >= 0, other=0)
    r0 = pid_r * BLOCK_R
    # split: rank blocks past the rank have nothing to add (the launcher zeroed z); unsplit, they
    # store the zeros of z past the rank
    skip = (tile_len == 0) | (slot < 0) | ((split_k > 1) & (r0 >= rank))
    if skip:
        return

    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < tile_len
    tok = tl.load(sorted_ids_ptr + tl.load(tile_starts_ptr + pid_tile) + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    row_mask = offs_r < rank
    a_offset = tl.load(a_offsets_ptr + slot * NPROJ + proj).to(tl.int32)
    row_start = a_offset + offs_r * K  # [BLOCK_R] virtual start of each A row

    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), split_k) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    k_hi = tl.where(r0 < rank, k_hi, k_lo)  # rank block past the rank: no loads, zeros out
    page_table_ptr = page_tables_ptr + slot * pt_stride_s
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if a_offset % VEC == 0:  # 16-byte loads need the adapter's rows aligned, checked per slot
        acc = shrink_k_loop(acc, x_ptr, pool_ptr, tok, m_mask, x_stride_t, page_table_ptr, num_pages,
                            row_start, row_mask, page_stride, layer_offset, K, k_lo, k_hi,
                            PAGE, VEC, BLOCK_K, ROW_IN_TWO_PAGES, DOT_PRECISION)
    else:
        acc = shrink_k_loop(acc, x_ptr, pool_ptr, tok, m_mask, x_stride_t, page_table_ptr, num_pages,
                            row_start, row_mask, page_stride, layer_offset, K, k_lo, k_hi,
                            PAGE, 1, BLOCK_K, ROW_IN_TWO_PAGES, DOT_PRECISION)

    if LAUNCH_DEPENDENTS:  # its loads issued: an expand launched after it with pdl may start, gather its tables
        gdc_launch_dependents()  # and page ids, and wait for this kernel's end before it reads z
    z_ptrs = z_ptr + tok[:, None] * z_stride_t + proj * z_stride_p + offs_r[None, :]
    z_mask = m_mask[:, None] & (offs_r[None, :] < R_MAX)
    if split_k > 1:
        tl.atomic_add(z_ptrs, acc, mask=z_mask, sem="relaxed")  # no ordering needed: z is read by the next launch
    else:
        tl.store(z_ptrs, acc, mask=z_mask)


def lora_shrink(x: torch.Tensor, pool: torch.Tensor, layer: int, token_slots: torch.Tensor,
                page_tables: torch.Tensor, ranks: torch.Tensor, a_offsets: torch.Tensor,
                z: torch.Tensor, *, meta: LoRAStepMeta | None = None,
                config: tiles.ShrinkTiles | None = None, z_zeroed: bool = False) -> None:
    """z[t, p, :r] = x[t] A_p^T for every token with an adapter (zeros past r), in place.

    x: [T, K] fp16/bf16/fp32, rows unit-stride, same dtype as pool
    pool: [P, L, PAGE] contiguous; adapter elements at pool[page_tables[s, v // PAGE], layer, v % PAGE]
    layer: 0 <= layer < L
    token_slots: [T] int32 adapter slot per token, -1 = none (such tokens' z rows are left unspecified)
    page_tables: [NS, MP] int32, each slot's pages in order
    ranks: [NS, NPROJ] int32, 0 = module absent; every rank <= R_MAX
    a_offsets: [NS, NPROJ] int64, virtual offset of A_p ([r, K] row-major); offsets < 2**31
    z: [T, NPROJ, R_MAX] float32 contiguous, output
    meta: the step's LoRAStepMeta (built here when None; build it once per step instead)
    config: tile override (tests, benchmarks); default from kernels.tiles
    With config.split_k > 1, z is zeroed first and accumulated with fp32 atomics (bitwise results
    may then differ between runs in the last bits).
    z_zeroed: the caller promises that z holds zeros wherever this launch writes (the rows of tokens
    with an adapter, ranks below each adapter's), so the memset is skipped: lora_expand(zero_after=z)
    of the layer before leaves it so (engine/lora_batch.py's two z buffers per group)
    On a device with programmatic dependent launch (kernels/launch.py) the kernel lets the next one
    in its stream start once each program has done its loads: only lora_expand(pdl=True) makes use
    of that, and it waits for this kernel's end before it reads z.
    """
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"lora_shrink: x must be [T, K] with unit stride along K, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")
    num_tokens, k = x.shape
    check_z("lora_shrink", z, num_tokens, pool.device)
    check_lora_args("lora_shrink", pool, layer, token_slots, page_tables, ranks, {"a_offsets": a_offsets},
                    num_tokens, z.shape[1])
    if x.dtype != pool.dtype or x.device != pool.device:
        raise ValueError(f"lora_shrink: x is {x.dtype} on {x.device}, pool is {pool.dtype} on {pool.device}")
    if num_tokens == 0:
        return
    num_slots, num_pages = page_tables.shape
    num_proj, r_max = z.shape[1], z.shape[2]
    page_size = pool.shape[2]
    on_gpu = pool.device.type == "cuda"
    meta = step_meta(meta, token_slots, num_slots)
    if config is None:
        config = tiles.shrink_tiles(meta.max_tiles, k, r_max, num_proj, page_size, meta.block_m,
                                    sm_count(pool.device), on_gpu)
    row_in_two_pages = k <= page_size
    if not row_in_two_pages and config.block_k > page_size:
        raise ValueError(f"lora_shrink: block_k {config.block_k} exceeds the page size {page_size} (rows of "
                         f"K = {k} are read in page-sized pieces)")
    if config.split_k > 1 and not z_zeroed:
        z.zero_()
    grid = (meta.max_tiles, tiles.cdiv(r_max, config.block_r) * config.split_k, num_proj)
    _lora_shrink_kernel[grid](
        x, pool, z,
        meta.sorted_token_ids, meta.tile_starts, meta.tile_lens, meta.tile_slots,
        page_tables, ranks, a_offsets,
        k, r_max, num_pages, layer * page_size, pool.stride(0), config.split_k,
        x.stride(0), page_tables.stride(0), z.stride(0), z.stride(1),
        NPROJ=num_proj, PAGE=page_size, VEC=vec_width(k, page_size),
        BLOCK_M=meta.block_m, BLOCK_K=config.block_k, BLOCK_R=config.block_r,
        ROW_IN_TWO_PAGES=row_in_two_pages, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        LAUNCH_DEPENDENTS=pdl_supported(pool.device),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
