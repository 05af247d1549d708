"""kernels/tiles.py's GPU choices for the LoRA shrink and expand: what a step's size may change (run-time
arguments: split_k, chunks_per_program) and what it may not (the compile keys the warm-up covers)."""
import dataclasses

import pytest

from kernels import tiles

H200_SMS, PAGE = 132, 2 * 16 * 32 * 128  # Llama-7B's pool page, in elements


@pytest.mark.parametrize("k,num_proj,max_tiles,split", [
    (4096, 3, 68, 3), (4096, 1, 68, 8), (4096, 2, 68, 4), (11008, 1, 68, 8),  # batch 64 over 64 adapters
    (4096, 3, 2, 16), (11008, 1, 2, 16),  # batch 1
    (256, 1, 2, 2),  # K too short to split further
])
def test_decode_shrink_splits_k_towards_four_programs_per_sm(k, num_proj, max_tiles, split):
    t = tiles.shrink_tiles(max_tiles, k, 16, num_proj, PAGE, tiles.MIN_DOT, H200_SMS)
    assert t.split_k == split and t.split_k in tiles.SHRINK_SPLITS
    binaries = {dataclasses.replace(tiles.shrink_tiles(n, k, rank, num_proj, PAGE, tiles.MIN_DOT, H200_SMS),
                                    split_k=0, block_r=0)
                for n in (1, 2, 5, 20, 68, 136, 300) for rank in (1, 8, 16, 17, 32, 64)}
    # one binary per rank class, whatever the step
    assert binaries == {tiles.ShrinkTiles(128, 0, 0, 2, 3), tiles.ShrinkTiles(256, 0, 0, 4, 3)}
    assert tiles.shrink_tiles(68, k, 17, num_proj, PAGE, tiles.MIN_DOT, H200_SMS).num_warps == 4


def test_prefill_tiles():
    # at least 4 K ranges from K = 4,096, ~2 programs per SM otherwise
    assert tiles.shrink_tiles(49, 4096, 16, 3, PAGE, 64, H200_SMS).split_k == 4
    assert tiles.shrink_tiles(49, 11008, 16, 1, PAGE, 64, H200_SMS).split_k == 6
    assert tiles.shrink_tiles(49, 256, 16, 3, PAGE, 64, H200_SMS).split_k == 2
    stored = {tiles.expand_tiles(n, 11008, 2, PAGE, 64, H200_SMS, accumulate=False) for n in (10, 49, 500)}
    assert stored == {tiles.ExpandTiles(128, 2, 4, 3)}  # the base GEMM's addend
    assert tiles.expand_tiles(49, 11008, 1, PAGE, 64, H200_SMS).chunks_per_program == 5  # in place: ~6 a SM


def test_rows_longer_than_a_page_read_page_sized_pieces():
    t = tiles.shrink_tiles(68, 11008, 16, 1, 64, tiles.MIN_DOT, H200_SMS)
    assert t.block_k == 64 and t.split_k <= tiles.cdiv(11008, 64)
