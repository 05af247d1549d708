"""Tile sizes for every kernel in one place: launchers ask here and never pick sizes themselves.

GPU choices come from the sweeps of bench/kernels.py --sweep on an H100 80GB, and the LoRA shrink's and
expand's decode and prefill choices from bench/kernels.py --sweep-decode on an H200 (docs/KERNELS.md);
CPU choices (TRITON_INTERPRET=1) are small tiles that still walk every code path, since the
interpreter's cost grows with tile area.

Compile keys: every choice here that becomes a kernel constexpr is one Triton binary, and the
warm-up (engine/warmup_plan.py) runs one step per choice a step can get. It varies the token
count (lora_block_m), the rank (the BLOCK_R of shrink_tiles and expand_block_r) and, for
decode attention, the batch size and context; the other arguments it passes are fixed for a
model. A new choice must depend on the step only through those, or reach the kernel as a
run-time argument whose Triton class cannot change: split_k and the fused kernel's max_split are
not specialized, expand's cols_per_program (block_n x chunks_per_program) is always a multiple of
16, and the fused kernel's num_programs is its grid, not an argument.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# a tl.dot operand needs at least 16 rows and columns
MIN_DOT = 16
# largest LoRA rank (R_MAX) the expand kernel takes in one step
MAX_RANK = 256
# K splits a decode-sized shrink chooses from (the counts that bench/kernels.py --sweep-decode times)
SHRINK_SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def prev_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ShrinkTiles:
    block_k: int  # elements of K per loop step (also the width of one paged row piece: <= PAGE)
    block_r: int  # rank rows per program; the grid has cdiv(R_MAX, block_r) rank blocks
    split_k: int  # programs sharing one K range; > 1 accumulates z with fp32 atomics
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ExpandTiles:
    block_n: int  # output columns per loop step
    chunks_per_program: int  # loop steps per program: a program owns block_n * chunks_per_program columns
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class FusedTiles:
    block_k: int  # elements of K per shrink step (<= PAGE when A's rows are longer than a page)
    block_n: int  # output columns per expand step (<= PAGE when B^T's rows are longer than a page)
    num_programs: int  # the grid: its programs share the step's (tile, projection, column range) items
    max_split: int  # most column ranges per (tile, projection); each range re-reads x's tile rows and A_p
    num_warps: int
    num_stages: int
    # pieces of the path that ranks <= 16 take when BLOCK_R > 16 (the BLOCK_R 16 binary ignores them)
    small_block_k: int = MIN_DOT
    small_block_n: int = MIN_DOT


@dataclass(frozen=True)
class DecodeAttentionTiles:
    block_n: int  # context tokens per loop step
    num_splits: int  # context partitions per sequence (flash-decoding); 1 = no reduction pass
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class PrefillAttentionTiles:
    block_m: int  # query tokens per program
    block_n: int  # context tokens per loop step
    num_warps: int
    num_stages: int


# silu_and_mul: columns of one row per program (norm and rotary programs take a whole row / head)
SILU_BLOCK_N = 1024


def elementwise_warps(block: int) -> int:
    """Warps for an element-wise program over ``block`` elements: about 256 a warp, 1 to 16."""
    return min(16, max(1, block // 256))


# steps of fewer tokens are decode-sized: LoRA tiles of MIN_DOT tokens, and eager ones do not put their LoRA
# on a stream of its own (engine/lora_batch.py)
PREFILL_SIZED_TOKENS = 512


def lora_sm_carveout(num_tokens: int) -> int:
    """SMs that a base GEMM of ``num_tokens`` rows in a decode graph leaves to the LoRA kernels
    beside it (engine/ops.py gemm_beside_lora). Measured on the H200 (docs/BENCHMARKS.md, "The LoRA
    stream's SMs"): at batch 64, 16 SMs took one rank-16 all-linear adapter from 0.85 to 0.89 of
    LoRA-off throughput and left 64 distinct adapters as they were (bandwidth-bound); at batch 1, 16
    changed nothing and 32 cost 6%. Larger steps are not measured, and their GEMMs come nearer to
    compute-bound, so they keep every SM."""
    return 16 if num_tokens <= 64 else 0


def lora_block_m(num_tokens: int, on_gpu: bool = True) -> int:
    """Tokens per LoRA tile (tokens of one tile share an adapter). Decode-sized steps have few
    tokens per adapter, so small tiles; prefill-sized steps have long segments, so large ones."""
    if not on_gpu or num_tokens < PREFILL_SIZED_TOKENS:
        return MIN_DOT
    return 64


def _paged_block(want: int, page_size: int) -> int:
    # a paged row piece spans at most two pages only if it is no longer than a page
    return max(MIN_DOT, min(want, prev_pow2(page_size)))


def shrink_tiles(max_tiles: int, k: int, max_rank: int, num_proj: int, page_size: int, block_m: int,
                 num_sms: int, on_gpu: bool = True) -> ShrinkTiles:
    block_r = max(MIN_DOT, min(next_pow2(max_rank), 64 if block_m >= 64 else 32))
    if not on_gpu:
        return ShrinkTiles(_paged_block(32, page_size) if k > page_size else 32, MIN_DOT, 1, 1, 1)
    programs = max(1, max_tiles * num_proj * cdiv(max_rank, block_r))
    if block_m >= 64:  # prefill: the bytes are x and the adapters' A rows
        block_k = _paged_block(64, page_size) if k > page_size else 64
        # ~2 programs per SM, and at least 4 K ranges once K reaches 4,096 (H200 sweep: 2,048 tokens
        # over 16 adapters, q,k,v 19.3 -> 16.0 us and gate,up 16.0 -> 15.1 us at split 4; down kept 6)
        split_k = max(1, min(max(cdiv(2 * num_sms, programs), min(4, cdiv(k, 1024))), cdiv(k, block_k), 16))
        return ShrinkTiles(block_k, block_r, split_k, 4, 3)
    if block_r > MIN_DOT:  # decode, ranks above 16: BLOCK_K 256, 4 warps, ~2 programs per SM (the H100 sweep)
        block_k = _paged_block(256, page_size) if k > page_size else 256
        split_k = max(1, min(cdiv(2 * num_sms, programs), cdiv(k, block_k), 16))
        return ShrinkTiles(block_k, block_r, split_k, 4, 3)
    # decode, ranks up to 16: each tile's A rows are few bytes (one rank-16 A of K 4,096 is 128 kB), so
    # many small programs of 2 warps keep more of them in flight; K is split to the count nearest ~4
    # programs per SM. H200 sweep (bench/kernels.py --sweep-decode, docs/KERNELS.md): at batch 64 over
    # 64 rank-16 adapters q,k,v 15.3 -> 14.2 us, o 9.3 -> 8.1, gate,up 14.7 -> 11.6, down 16.9 -> 13.8
    # against the rule above; batch 1 within 0.4 us either way. At BLOCK_R 32 the same tiles were slower
    # (q,k,v at R_MAX 64 over rank-16 adapters 21.2 -> 25.3 us), so those keep the rule above. The warps
    # may depend on the rank class, not on the program count (compile keys, above)
    block_k = _paged_block(128, page_size) if k > page_size else 128
    ideal = 4 * num_sms / programs
    split_k = min((c for c in SHRINK_SPLITS if c <= cdiv(k, block_k)), key=lambda c: abs(math.log(c / ideal)))
    return ShrinkTiles(block_k, block_r, split_k, 2, 3)


def expand_block_r(max_rank: int) -> int:
    """The expand kernel covers the whole rank in one step (masked by each adapter's own rank)."""
    return max(MIN_DOT, next_pow2(max_rank))


def lora_rank_bound(max_rank: int, max_lora_rank: int) -> int:
    """R_MAX of a decode graph's LoRA kernels for a step whose largest rank is ``max_rank``: that
    rank's BLOCK_R class, at most max_lora_rank (engine/decode_graphs.py keys its graphs by it). With
    max_lora_rank itself, rank-16 adapters ran binaries of BLOCK_R 32 (shrink) and 64 (expand): on
    the H200 the split pair took 1.55 to 1.7 times as long as at R_MAX 16, at batch 64 over 64 adapters
    (bench/kernels.py's "graph" rows)."""
    return min(expand_block_r(max_rank), max_lora_rank)


def expand_tiles(max_tiles: int, max_n: int, num_proj: int, page_size: int, block_m: int, num_sms: int,
                 on_gpu: bool = True, accumulate: bool = True) -> ExpandTiles:
    if not on_gpu:
        return ExpandTiles(_paged_block(32, page_size) if max_n > page_size else 32, 2, 1, 1)
    block_n = 128
    if max_n > page_size:
        block_n = _paged_block(block_n, page_size)
    if block_m >= 64 and not accumulate:
        # prefill storing the base GEMM's addend: two column blocks per program (H200 sweep, 2,048 tokens
        # over 16 adapters: q,k,v 24.2 -> 21.3 us, gate,up 38.2 -> 36.3, down 12.0 -> 9.9 against the rule
        # below; adding into y in place, 2 was slower: up 4096 -> 11008 39.7 -> 41.9 us)
        return ExpandTiles(block_n, 2, 4, 3)
    # ~6 programs per SM, each walking several column blocks so that its loads pipeline (measured on
    # the H100: 7 or 8 steps for decode up/qkv, 2 for down, 4 to 5 for prefill; on the H200 decode is
    # within 1 us of the sweep's best at batch 64)
    blocks = max_tiles * num_proj * cdiv(max_n, block_n)
    chunks = max(1, min(8, blocks // (6 * num_sms)))
    return ExpandTiles(block_n, chunks, 4, 3)


def lora_fused(block_m: int) -> bool:
    """Whether steps of this LoRA tile class (lora_block_m) run each projection group's LoRA as one
    lora_fused launch (z on chip) rather than lora_shrink + lora_expand through a z buffer in memory.
    Measured on the H200 (bench/engine.py, docs/BENCHMARKS.md "LoRA kernels on the H200"), the split
    pair is faster in both classes, so no step takes the fused kernel yet:
    - decode (BLOCK_M 16): each fused program reads its tile's whole A (r x K) before its first
      output, where the split shrink spreads K over split_k programs: batch 1 with one rank-16
      all-linear adapter took 7.32 ms fused against 5.79 ms split (LoRA off 4.32 ms);
    - prefill (BLOCK_M 64): 2,048 tokens over 16 rank-16 all-linear adapters at 0.81 of the LoRA-off
      tokens/s fused against 0.87 split, in the same run.
    bench/engine.py (--decode-kernels, its prefill rows) and bench/kernels.py time both. The warm-up
    runs one step per token class, so this choice may depend on block_m only."""
    return False


def fused_tiles(max_tiles: int, k: int, max_n: int, num_proj: int, max_rank: int, page_size: int, block_m: int,
                num_sms: int, on_gpu: bool = True) -> FusedTiles:
    """Tiles of lora_fused for a launch of ``num_proj`` (<= 4) projections of K inputs and at most
    ``max_n`` outputs each; BLOCK_R is expand_block_r(max_rank) (the whole rank in one tile).

    The step's tiles with an adapter are counted on the device, where the kernel splits each
    (tile, projection)'s columns into as many ranges as fill its num_programs programs, up to
    max_split. The bound keeps the re-reads in check: each range reads the tile's x rows and A_p
    (r x K) again (from L2 when the programs of one tile run together, as the grid orders them),
    so a range keeps at least K / ratio columns of B^T (r x N_p / max_split)."""
    block_r = expand_block_r(max_rank)
    if not on_gpu:
        block_k = _paged_block(32, page_size) if k > page_size else 32
        block_n = MIN_DOT  # small shapes still get several column ranges per (tile, projection)
        return FusedTiles(block_k, block_n, 16, 3, 1, 1, small_block_k=MIN_DOT, small_block_n=32)
    # (block_k, block_n, warps) per BLOCK_R: the largest pieces whose sm_90 binary (Triton 3.9,
    # compiled on the CPU machine) spills no registers; e.g. decode rank 32 at 256 x 128 spills,
    # prefill rank 16 at 64 x 128 spills 1 kB a thread (as lora_expand's BLOCK_M 64 binary does),
    # and at 64 x 64 with 4 warps 16 bytes for q,k,v
    if block_m >= 64:  # prefill: full x tiles; y's bytes dominate
        shapes = {16: (64, 64, 8), 32: (64, 64, 8), 64: (64, 64, 8), 128: (64, 64, 8)}
        block_k, block_n, num_warps = shapes.get(block_r, (32, 32, 8))
        ratio, num_stages = 2, 3
    else:  # decode: few tokens per tile; long A and B^T pieces per step keep more bytes in flight
        shapes = {16: (256, 256, 4), 32: (128, 128, 4), 64: (128, 128, 8), 128: (64, 64, 8)}
        block_k, block_n, num_warps = shapes.get(block_r, (32, 32, 8))
        # a stage more than the split kernels where it fits: the same registers, more bytes in
        # flight; from BLOCK_R 64 a float32 pool's 4 stages would pass an SM's 227 kB
        ratio, num_stages = 4, 4 if block_r <= 32 else 3
    small_block_k, small_block_n, _ = shapes[16]
    if k > page_size:
        block_k, small_block_k = _paged_block(block_k, page_size), _paged_block(small_block_k, page_size)
    if max_n > page_size:
        block_n, small_block_n = _paged_block(block_n, page_size), _paged_block(small_block_n, page_size)
    col_block = max(block_n, small_block_n)
    max_split = max(1, min(cdiv(max_n, col_block), cdiv(ratio * max_n, k)))
    num_programs = max(1, min(2 * num_sms, max_tiles * min(num_proj, 4) * max_split))  # ~2 programs per SM
    return FusedTiles(block_k, block_n, num_programs, max_split, num_warps, num_stages, small_block_k, small_block_n)


def decode_attention_tiles(num_seqs: int, num_kv_heads: int, max_context: int, head_dim: int,
                           num_sms: int, on_gpu: bool = True) -> DecodeAttentionTiles:
    if not on_gpu:
        return DecodeAttentionTiles(MIN_DOT, 1, 1, 1)
    block_n = 32
    programs = num_seqs * num_kv_heads
    target = 2 * num_sms  # measured: B=64 x 8 KV heads (512 programs) runs best unsplit
    num_splits = 1
    if programs < target:
        num_splits = min(cdiv(target, programs), max(1, cdiv(max_context, 4 * block_n)), 64)
    return DecodeAttentionTiles(block_n, num_splits, 4, 4)


def prefill_attention_tiles(head_dim: int, on_gpu: bool = True) -> PrefillAttentionTiles:
    if not on_gpu:
        return PrefillAttentionTiles(MIN_DOT, MIN_DOT, 1, 1)
    return PrefillAttentionTiles(64, 64, 4, 3)
