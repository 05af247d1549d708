"""What the LoRA kernels share: reading adapter rows through page tables, the shrink and expand
loops (lora_shrink and lora_expand run one each, lora_fused both), argument checks.

An adapter in slot s owns pages page_tables[s, :]; element v of its virtual space in layer l is
pool[page_tables[s, v // PAGE], l, v % PAGE]. A run of at most PAGE consecutive virtual elements
therefore spans at most two pages: the kernels gather two page ids per row (not per element) and
pick between them per element. When a whole row (K for A, N_p for B^T) fits in a page's length,
that gather happens once per row before the loop over the row, so the loop's loads depend on no
other load and pipeline; otherwise it happens per BLOCK-long piece of the row, inside the loop.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels.lora_meta import LoRAStepMeta

# widest vector (in elements) we promise the compiler; 8 x fp16 = 16 bytes
MAX_VEC = 8
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def row_pages(page_table_ptr, num_pages, row_start, row_len, row_mask, page_stride, PAGE: tl.constexpr):
    """Where rows of row_len <= PAGE virtual elements live: each spans at most two pages.

    page_table_ptr: the slot's row of page_tables ([MP] int32, num_pages = MP); row_start: [ROWS]
    int32 virtual offsets; row_mask: [ROWS] rows to read. Returns, per row, the offset of the
    row's first element inside its first page, and the pool offsets of the first page and of the
    second page minus PAGE (so that both take the same in-row position below).
    """
    page_idx = row_start // PAGE
    in_page = row_start - page_idx * PAGE
    first = tl.load(page_table_ptr + page_idx, mask=row_mask, other=0).to(tl.int64)
    needs_second = row_mask & (in_page + row_len > PAGE) & (page_idx + 1 < num_pages)
    second = tl.load(page_table_ptr + page_idx + 1, mask=needs_second, other=0).to(tl.int64)
    return in_page, first * page_stride, second * page_stride - PAGE


@triton.jit
def loop_pages(page_table_ptr, num_pages, row_start, row_len, row_mask, page_stride, PAGE: tl.constexpr,
               ROW_IN_TWO_PAGES: tl.constexpr):
    """What shrink_k_loop and expand_n_loop take as the rows' pages: those of row_pages when whole rows
    fit a page's length (gathered once, before the loop, so that the loop's loads depend on no other
    load and pipeline), else placeholders (piece_offsets gathers each piece's pages in the loop)."""
    if ROW_IN_TWO_PAGES:
        in_page, first, second = row_pages(page_table_ptr, num_pages, row_start, row_len, row_mask, page_stride, PAGE)
    else:
        in_page, first, second = row_start, row_start, row_start
    return in_page, first, second


@triton.jit
def row_offsets(in_page, first_base, second_base, col0, layer_offset,
                PAGE: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Pool offsets [ROWS, BLOCK] of columns col0 .. col0+BLOCK-1 of rows placed by row_pages.

    VEC > 1 promises that row starts, col0, PAGE, page_stride and layer_offset are multiples of
    VEC, so each run of VEC columns is contiguous and aligned (16-byte loads).
    """
    local = in_page[:, None] + col0 + tl.arange(0, BLOCK)[None, :]  # [ROWS, BLOCK] int32
    offsets = tl.where(local < PAGE, first_base[:, None], second_base[:, None]) + local + layer_offset
    if VEC > 1:
        offsets = tl.max_contiguous(tl.multiple_of(offsets, [1, VEC]), [1, VEC])
    return offsets


@triton.jit
def piece_offsets(in_page, first, second, page_table_ptr, num_pages, row_start, row_mask, page_stride, col0,
                  layer_offset, PAGE: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
                  ROW_IN_TWO_PAGES: tl.constexpr):
    """Pool offsets [ROWS, BLOCK] of columns col0 .. col0+BLOCK-1: from the rows' pages gathered
    once (in_page, first, second of row_pages) when whole rows fit a page's length, else from
    the pages of this piece, gathered here."""
    if ROW_IN_TWO_PAGES:
        return row_offsets(in_page, first, second, col0, layer_offset, PAGE, BLOCK, VEC)
    piece_in_page, piece_first, piece_second = row_pages(page_table_ptr, num_pages, row_start + col0, BLOCK,
                                                         row_mask, page_stride, PAGE)
    return row_offsets(piece_in_page, piece_first, piece_second, 0, layer_offset, PAGE, BLOCK, VEC)


@triton.jit
def shrink_k_loop(acc, x_ptr, pool_ptr, tok, m_mask, x_stride_t, page_table_ptr, num_pages, row_start,
                  row_mask, page_stride, layer_offset, K, k_lo, k_hi,
                  PAGE: tl.constexpr, VEC: tl.constexpr, BLOCK_K: tl.constexpr, ROW_IN_TWO_PAGES: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_R] += x[tok, k_lo:k_hi] A[rows, k_lo:k_hi]^T: tok [BLOCK_M] token rows of x
    (m_mask), row_start [BLOCK_R] virtual starts of A's rows in the slot's pages (row_mask)."""
    in_page, first, second = loop_pages(page_table_ptr, num_pages, row_start, K, row_mask, page_stride, PAGE,
                                        ROW_IN_TWO_PAGES)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + tok[:, None] * x_stride_t + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        a_offs = piece_offsets(in_page, first, second, page_table_ptr, num_pages, row_start, row_mask, page_stride,
                               k0, layer_offset, PAGE, BLOCK_K, VEC, ROW_IN_TWO_PAGES)
        a = tl.load(pool_ptr + a_offs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
        acc += tl.dot(x, tl.trans(a), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def expand_n_loop(zt, pool_ptr, y_ptr, y_rows, m_mask, page_table_ptr, num_pages, row_start, r_mask, n_size,
                  in_page, first, second, n_lo, n_hi, scale, page_stride, layer_offset,
                  PAGE: tl.constexpr, VEC: tl.constexpr, BLOCK_N: tl.constexpr, ROW_IN_TWO_PAGES: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr = True):
    """y[rows, n_lo:n_hi] += scale * zt B^T[:, n_lo:n_hi] (ACCUMULATE; else y[...] = scale * zt B^T,
    rounded to y's dtype, without reading y): zt [BLOCK_M, BLOCK_R] in the pool's dtype, y_rows
    [BLOCK_M] offsets of the tokens' first output column (m_mask), row_start [BLOCK_R] virtual
    starts of B^T's rows (r_mask), each n_size long; in_page, first, second: loop_pages of those rows
    (the caller gathers them, so that it may do so before it waits for the kernel before it)."""
    cols = tl.arange(0, BLOCK_N)
    y_row_ptrs = y_ptr + y_rows[:, None]  # [BLOCK_M, 1]
    y_dtype = y_ptr.dtype.element_ty
    if ACCUMULATE:  # y is read one step ahead (the pipeliner stages only the dot's operands), so its latency overlaps
        y_next = tl.load(y_row_ptrs + (n_lo + cols)[None, :],
                         mask=m_mask[:, None] & ((n_lo + cols) < n_size)[None, :], other=0.0)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + cols
        n_mask = offs_n < n_size  # a chunk passes n_hi only at the end of the row
        if ACCUMULATE:
            y = y_next
            next_n = offs_n + BLOCK_N
            next_mask = (next_n < n_size) & (next_n < n_hi)  # n_hi is a multiple of BLOCK_N from n_lo, or n_size
            y_next = tl.load(y_row_ptrs + next_n[None, :], mask=m_mask[:, None] & next_mask[None, :], other=0.0)
        b_offs = piece_offsets(in_page, first, second, page_table_ptr, num_pages, row_start, r_mask, page_stride,
                               n0, layer_offset, PAGE, BLOCK_N, VEC, ROW_IN_TWO_PAGES)
        b = tl.load(pool_ptr + b_offs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        acc = tl.dot(zt, b, input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        if ACCUMULATE:
            acc += y.to(tl.float32)
        tl.store(y_row_ptrs + offs_n[None, :], acc.to(y_dtype), mask=m_mask[:, None] & n_mask[None, :])


def step_meta(meta: LoRAStepMeta | None, token_slots: torch.Tensor, num_slots: int) -> LoRAStepMeta:
    """The step's LoRAStepMeta (built here if the caller has none), checked against its tables."""
    if meta is None:
        meta = LoRAStepMeta.build(token_slots, num_slots)
    meta.check(token_slots, num_slots)
    return meta


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter's tiles ignore it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def vec_width(*sizes: int) -> int:
    """Largest power of two <= MAX_VEC dividing every size (row lengths, page size)."""
    g = MAX_VEC
    for s in sizes:
        g = math.gcd(g, s)
    return g


def check_lora_args(name: str, pool: torch.Tensor, layer: int, token_slots: torch.Tensor,
                    page_tables: torch.Tensor, ranks: torch.Tensor, offsets: dict[str, torch.Tensor],
                    num_tokens: int, num_proj: int) -> None:
    """Checks shared by the launchers (offsets: a_offsets and/or b_offsets by name); raises
    ValueError naming the argument."""
    def fail(msg: str) -> None:
        raise ValueError(f"{name}: {msg}")

    if pool.dim() != 3 or not pool.is_contiguous():
        fail(f"pool must be a contiguous [P, L, PAGE] tensor, got shape {tuple(pool.shape)} "
             f"strides {pool.stride()}")
    if pool.dtype not in DTYPES:
        fail(f"pool dtype {pool.dtype} not supported; use one of {DTYPES}")
    if not 0 <= layer < pool.shape[1]:
        fail(f"layer {layer} out of range for a pool of {pool.shape[1]} layers")
    if pool.data_ptr() % 16:
        fail("pool must be 16-byte aligned")
    if token_slots.dtype != torch.int32 or token_slots.shape != (num_tokens,):
        fail(f"token_slots must be int32 [{num_tokens}], got {token_slots.dtype} {tuple(token_slots.shape)}")
    if page_tables.dtype != torch.int32 or page_tables.dim() != 2 or not page_tables.is_contiguous():
        fail(f"page_tables must be a contiguous int32 [NS, MP] tensor, got {page_tables.dtype} "
             f"{tuple(page_tables.shape)}")
    num_slots = page_tables.shape[0]
    if ranks.dtype != torch.int32 or ranks.shape != (num_slots, num_proj) or not ranks.is_contiguous():
        fail(f"ranks must be a contiguous int32 [{num_slots}, {num_proj}] tensor, got {ranks.dtype} "
             f"{tuple(ranks.shape)}")
    for offsets_name, t in offsets.items():
        if t.dtype != torch.int64 or t.shape != (num_slots, num_proj) or not t.is_contiguous():
            fail(f"{offsets_name} must be a contiguous int64 [{num_slots}, {num_proj}] tensor, got "
                 f"{t.dtype} {tuple(t.shape)}")
    for arg, t in (("token_slots", token_slots), ("page_tables", page_tables), ("ranks", ranks), *offsets.items()):
        if t.device != pool.device:
            fail(f"{arg} is on {t.device} but pool is on {pool.device}")


def check_z(name: str, z: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    if z.dtype != torch.float32 or z.dim() != 3 or z.shape[0] != num_tokens or not z.is_contiguous():
        raise ValueError(f"{name}: z must be a contiguous float32 [{num_tokens}, NPROJ, R_MAX] tensor, got {z.dtype} "
                         f"{tuple(z.shape)}")
    if z.device != device:
        raise ValueError(f"{name}: z is on {z.device} but pool is on {device}")


def check_output(name: str, y: torch.Tensor, pool: torch.Tensor, scales: torch.Tensor, num_slots: int,
                 num_proj: int, out_offsets: list[int], out_sizes: list[int]) -> None:
    """y [T, N_total] and where the projections' outputs sit in it; scales [NS, NPROJ] float32."""
    if y.dim() != 2 or y.stride(1) != 1:
        raise ValueError(f"{name}: y must be [T, N] with unit stride along N, got shape {tuple(y.shape)} "
                         f"strides {y.stride()}")
    if scales.dtype != torch.float32 or scales.shape != (num_slots, num_proj) or not scales.is_contiguous():
        raise ValueError(f"{name}: scales must be a contiguous float32 [{num_slots}, {num_proj}] tensor, "
                         f"got {scales.dtype} {tuple(scales.shape)}")
    if y.dtype != pool.dtype or y.device != pool.device or scales.device != pool.device:
        raise ValueError(f"{name}: y is {y.dtype} on {y.device}, scales on {scales.device}, "
                         f"pool is {pool.dtype} on {pool.device}")
    if len(out_offsets) != num_proj or len(out_sizes) != num_proj:
        raise ValueError(f"{name}: out_offsets and out_sizes need {num_proj} entries, got "
                         f"{len(out_offsets)} and {len(out_sizes)}")
    for off, n in zip(out_offsets, out_sizes):
        if n <= 0 or off < 0 or off + n > y.shape[1]:
            raise ValueError(f"{name}: projection at y[:, {off}:{off + n}] does not fit y of {y.shape[1]} columns")
