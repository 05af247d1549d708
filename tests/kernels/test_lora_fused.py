"""lora_fused against its twin kernels.reference.lora_fused (reference shrink, then expand).

Interpreter on CPU (float32, small shapes), compiled on a GPU (fp16/bf16/fp32, plus the `gpu`
real shapes). Outputs are poisoned where nothing may be written: rows of tokens without an
adapter and columns outside the projections must come back bit for bit.
"""
from __future__ import annotations

import pytest
import torch

from kernels import reference, tiles
from kernels.lora_fused import lora_fused
from kernels.lora_meta import LoRAStepMeta
from test_lora import (DEVICE, DTYPES, GPU_CASES, ON_GPU, AdapterPool, assert_close, decode_slots, make_adapter_pool,
                       segment_slots)


def run_fused_and_compare(ap: AdapterPool, token_slots: list[int], k: int, out_sizes: list[int], layer: int,
                          dtype: torch.dtype, *, max_rank: int | None = None, meta_block_m: int | None = None,
                          config: tiles.FusedTiles | None = None, gap: int = 8, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_tokens = len(token_slots)
    out_offsets = [gap + sum(out_sizes[:j]) for j in range(len(out_sizes))]  # a gap before, which stays untouched
    n_total = gap + sum(out_sizes) + 5
    max_rank = max_rank or max(1, int(ap.ranks.max()))
    slots = torch.tensor(token_slots, dtype=torch.int32, device=DEVICE)
    meta = None if meta_block_m is None else LoRAStepMeta.build(slots, ap.page_tables.shape[0], meta_block_m)
    x = torch.randn(num_tokens, k, generator=gen).to(DEVICE, dtype)
    y = torch.randn(num_tokens, n_total, generator=gen).to(DEVICE, dtype)
    has_adapter = slots >= 0
    y[~has_adapter] = float("nan")  # rows nobody may touch: NaN must come back as it went in
    y_before, y_ref = y.clone(), y.clone()
    args = (ap.page_tables, ap.ranks, ap.a_offsets, ap.b_offsets, ap.scales)
    lora_fused(x, ap.pool, layer, slots, *args, y, out_offsets, out_sizes, max_rank, meta=meta, config=config)
    reference.lora_fused(x, ap.pool, layer, slots, *args, y_ref, out_offsets, out_sizes, max_rank)
    if has_adapter.any():
        assert_close(y[has_adapter], y_ref[has_adapter], dtype)
    assert y[~has_adapter].isnan().all(), "rows without an adapter changed"
    covered = torch.zeros(n_total, dtype=torch.bool, device=DEVICE)
    for off, n in zip(out_offsets, out_sizes):
        covered[off:off + n] = True
    assert torch.equal(y[has_adapter][:, ~covered], y_before[has_adapter][:, ~covered]), \
        "columns outside the projections changed"


MIXED_RANKS = [[1, 8, 0], [8, 16, 1], [16, 0, 16], [64, 64, 8], [128, 1, 128]]

# (name, ranks per slot and projection, K, out_sizes, page size, token slots)
CASES = [
    # decode (BGMV): tokens in random order over adapters of ranks 1 to 128, every 4th without one
    ("decode_mixed_ranks_qkv", MIXED_RANKS, 48, [32, 16, 16], 64, decode_slots(23, 5, seed=11, none_every=4)),
    ("decode_one_token", [[16]], 40, [24], 48, [0]),
    ("decode_one_adapter_many_tokens", [[8, 8]], 33, [40, 40], 48, decode_slots(37, 1, seed=12, none_every=6)),
    # prefill (SGMV): runs of one adapter, tile boundaries inside runs, several adapters per 16 tokens
    ("prefill_segments_gate_up", [[16, 16], [1, 1], [128, 64], [8, 0]], 40, [48, 48], 48,
     segment_slots([20, 1, 17, 3, 2, 33, 5], [0, 1, 2, -1, 3, 0, 1])),
    ("prefill_ranks_1_to_128", [[r] for r in (1, 8, 16, 64, 128)], 64, [56], 64,
     segment_slots([5, 16, 1, 18, 9, 4], [4, 0, 1, 2, 3, -1])),
    # rows longer than a page: read in page-sized pieces
    ("rows_past_a_page", [[16, 5], [3, 33]], 80, [72, 40], 48, segment_slots([9, 3, 12], [0, -1, 1])),
    ("no_adapter_tokens", [[4]], 33, [40], 48, [-1, -1, -1]),
    ("empty_batch", [[4]], 33, [40], 48, []),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_fused_matches_reference(case, dtype):
    _, ranks, k, out_sizes, page_size, token_slots = case
    ap = make_adapter_pool(ranks, k, out_sizes, page_size, num_layers=3, dtype=dtype)
    run_fused_and_compare(ap, token_slots, k, out_sizes, layer=2, dtype=dtype)


# (name, FusedTiles, BLOCK_M): the column split and the persistent loop of the grid
# 6 tiles with an adapter x 3 projections = 18 pairs (BLOCK_M 16; 5 at BLOCK_M 64)
TILE_PATHS = [
    ("one_program_does_everything", tiles.FusedTiles(32, 32, 1, 1, 1, 1), None),
    ("more_pairs_than_programs", tiles.FusedTiles(16, 16, 7, 8, 1, 1), None),
    ("two_ranges_per_pair", tiles.FusedTiles(32, 16, 36, 2, 1, 1), None),  # 48 columns: 32 + 16; 16: one range
    ("three_ranges_per_pair", tiles.FusedTiles(32, 16, 64, 16, 1, 1), None),
    ("ranges_capped_by_max_split", tiles.FusedTiles(32, 16, 64, 2, 1, 1), None),
    ("prefill_block_m_64", tiles.FusedTiles(32, 16, 15, 3, 4, 1), 64),
]


@pytest.mark.parametrize("path", TILE_PATHS, ids=lambda p: p[0])
def test_fused_tile_paths(path):
    _, config, block_m = path
    dtype = DTYPES[-1]
    ranks, k, out_sizes = [[16, 8, 2], [3, 33, 0], [1, 1, 1], [0, 0, 5]], 40, [48, 16, 40]
    token_slots = segment_slots([40, 1, 9, 2, 3, 5], [0, 1, -1, 2, 3, 0])
    ap = make_adapter_pool(ranks, k, out_sizes, 48, num_layers=2, dtype=dtype)
    run_fused_and_compare(ap, token_slots, k, out_sizes, layer=1, dtype=dtype, meta_block_m=block_m, config=config)


def test_fused_unaligned_rows_on_reversed_pages():
    dtype = DTYPES[-1]
    ranks, k, out_sizes = [[16], [7], [2]], 41, [35]
    ap = make_adapter_pool(ranks, k, out_sizes, 40, num_layers=2, dtype=dtype, align=1, reverse_pages=True)
    run_fused_and_compare(ap, decode_slots(19, 3, seed=13), k, out_sizes, layer=0, dtype=dtype)


def test_fused_with_a_rank_bound_above_every_rank():
    """The decode graphs pass max_lora_rank, not the step's largest rank: BLOCK_R wider than needed."""
    dtype = DTYPES[-1]
    ap = make_adapter_pool([[4], [1]], 32, [24], 32, num_layers=1, dtype=dtype)
    run_fused_and_compare(ap, decode_slots(9, 2, seed=14), 32, [24], layer=0, dtype=dtype, max_rank=64)


def test_fused_tiles_fill_the_gpu_and_bound_the_rereads():
    # decode, 64 adapters, up projection: one or two column ranges per tile; one adapter: more
    many = tiles.fused_tiles(max_tiles=73, k=4096, max_n=11008, num_proj=1, max_rank=16, page_size=65536,
                             block_m=16, num_sms=132)
    assert many.num_programs == 264 and many.max_split == tiles.cdiv(4 * 11008, 4096)
    down = tiles.fused_tiles(max_tiles=73, k=11008, max_n=4096, num_proj=1, max_rank=16, page_size=65536,
                             block_m=16, num_sms=132)
    assert down.max_split == 2  # K > N: a range re-reads 11008 x r of A for its share of 4096 x r
    one = tiles.fused_tiles(max_tiles=2, k=4096, max_n=11008, num_proj=2, max_rank=16, page_size=65536,
                            block_m=16, num_sms=132)
    assert one.num_programs == 2 * 2 * one.max_split  # no more programs than items can exist
    wide = tiles.fused_tiles(max_tiles=2, k=4096, max_n=4096, num_proj=1, max_rank=128, page_size=65536,
                             block_m=64, num_sms=132)
    assert wide.num_warps == 8 and wide.block_n == 64


def test_fused_rejects_bad_arguments():
    ap = make_adapter_pool([[4]], 32, [16], 32, num_layers=1, dtype=torch.float32)
    slots = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    x = torch.randn(2, 32, device=DEVICE)
    y = torch.zeros(2, 16, device=DEVICE)
    tables = (ap.page_tables, ap.ranks, ap.a_offsets, ap.b_offsets, ap.scales)
    with pytest.raises(ValueError, match="b_offsets must be a contiguous int64"):
        lora_fused(x, ap.pool, 0, slots, ap.page_tables, ap.ranks, ap.a_offsets, ap.b_offsets.int(), ap.scales, y,
                   [0], [16], 4)
    with pytest.raises(ValueError, match="does not fit y"):
        lora_fused(x, ap.pool, 0, slots, *tables, y, [8], [16], 4)
    with pytest.raises(ValueError, match="max_rank"):
        lora_fused(x, ap.pool, 0, slots, *tables, y, [0], [16], 0)
    with pytest.raises(ValueError, match="scales must be"):
        lora_fused(x, ap.pool, 0, slots, *tables[:4], ap.scales.double(), y, [0], [16], 4)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES + [
    ("decode_ranks_1_to_128_qkv", 4096, [4096, 1024, 1024], [[1, 8, 16], [16, 64, 128], [128, 0, 1]] * 4,
     decode_slots(256, 12, seed=15)),
    ("decode_batch_1_all_linear_up", 4096, [11008, 11008], [[16, 16]], [0]),
], ids=lambda c: c[0])
def test_fused_real_shapes(case, dtype):
    _, k, out_sizes, ranks, token_slots = case
    ap = make_adapter_pool(ranks, k, out_sizes, 2 * 16 * 8 * 128, num_layers=2, dtype=dtype, align=1 if k % 8 else 8)
    run_fused_and_compare(ap, token_slots, k, out_sizes, layer=1, dtype=dtype, gap=0)
