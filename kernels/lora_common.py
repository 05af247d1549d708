"""What lora_shrink and lora_expand share: reading adapter rows through page tables, argument checks.

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
                    page_tables: torch.Tensor, ranks: torch.Tensor, offsets: torch.Tensor,
                    offsets_name: str, z: torch.Tensor, num_tokens: int) -> None:
    """Checks shared by both launchers; raises ValueError naming the argument."""
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
    num_slots, num_proj = page_tables.shape[0], z.shape[1]
    if ranks.dtype != torch.int32 or ranks.shape != (num_slots, num_proj) or not ranks.is_contiguous():
        fail(f"ranks must be a contiguous int32 [{num_slots}, {num_proj}] tensor, got {ranks.dtype} "
             f"{tuple(ranks.shape)}")
    if offsets.dtype != torch.int64 or offsets.shape != (num_slots, num_proj) or not offsets.is_contiguous():
        fail(f"{offsets_name} must be a contiguous int64 [{num_slots}, {num_proj}] tensor, got "
             f"{offsets.dtype} {tuple(offsets.shape)}")
    if z.dtype != torch.float32 or z.dim() != 3 or z.shape[0] != num_tokens or not z.is_contiguous():
        fail(f"z must be a contiguous float32 [{num_tokens}, NPROJ, R_MAX] tensor, got {z.dtype} "
             f"{tuple(z.shape)}")
    for arg, t in (("token_slots", token_slots), ("page_tables", page_tables), ("ranks", ranks),
                   (offsets_name, offsets), ("z", z)):
        if t.device != pool.device:
            fail(f"{arg} is on {t.device} but pool is on {pool.device}")
