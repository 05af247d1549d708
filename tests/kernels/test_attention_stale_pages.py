"""Attention reads nothing past a sequence's length: the kernels and their reference twin give the
same, finite output whether the K/V rows past seq_len (the rest of a partly filled last page,
pages the block table names past the sequence's blocks) hold random values or NaN / +-inf.

Those rows are another request's leftovers in the unified pool (freed pages, the decode graphs'
scratch page); a weight of exactly 0 times NaN is still NaN, so the loads must be masked.
"""
from __future__ import annotations

import pytest
import torch

from kernels import reference, tiles
from kernels.paged_attention import paged_decode_attention
from kernels.prefill_attention import prefill_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
POISON = (float("nan"), float("inf"), float("-inf"))
NUM_LAYERS, LAYER = 2, 1


def make_step(q_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int, extra_columns: int = 2):
    """Random K/V on pages in random order; each block table ends with `extra_columns` columns
    naming spare pages (as the engine's padded tables do). Returns q, the pool, the tables and
    a function that poisons every element past each sequence's length in the pool."""
    gen = torch.Generator().manual_seed(0)
    blocks = [-(-n // block_size) for n in context_lens]
    num_spare = 2
    num_pages = sum(blocks) + num_spare
    order = torch.randperm(num_pages, generator=gen)
    spare = order[sum(blocks):]
    tables = torch.empty(len(blocks), max(blocks) + extra_columns, dtype=torch.int32)
    used = 0
    for s, n in enumerate(blocks):
        tables[s, :n] = order[used:used + n]
        tables[s, n:] = spare[s % num_spare]
        used += n
    page_size = 2 * block_size * num_kv_heads * head_dim
    pool = torch.randn(num_pages, NUM_LAYERS, page_size, generator=gen)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    seq_lens = torch.tensor(context_lens, dtype=torch.int32)

    def poison(pool: torch.Tensor) -> torch.Tensor:
        pool = pool.clone()
        kv = pool[:, LAYER].view(num_pages, 2, block_size, num_kv_heads, head_dim)
        values = torch.tensor(POISON).repeat(-(-head_dim // 3))[:head_dim]
        for s, n in enumerate(context_lens):
            last, filled = int(tables[s, blocks[s] - 1]), n - (blocks[s] - 1) * block_size
            kv[last, :, filled:] = values  # K and V rows past the length in the last page
        kv[spare] = values
        pool[:, 1 - LAYER] = values.repeat(page_size // head_dim)  # other layers too: a page stride mistake would show
        return pool

    return q, pool, tables, seq_lens, starts, poison


def kv_views(pool: torch.Tensor, block_size: int, num_kv_heads: int, head_dim: int):
    kv = pool[:, LAYER].view(pool.shape[0], 2, block_size, num_kv_heads, head_dim)
    return kv[:, 0].to(DEVICE), kv[:, 1].to(DEVICE)  # [P, BS, KVH, D], page stride L * PAGE


def decode_kernel(num_splits):
    def call(q, k, v, tables, seq_lens, starts, scale, window):
        config = tiles.DecodeAttentionTiles(16, num_splits, 4 if DEVICE.type == "cuda" else 1, 1)
        return paged_decode_attention(q, k, v, tables, seq_lens, starts, scale, window, config=config)
    return call


def prefill_kernel(q, k, v, tables, seq_lens, starts, scale, window):
    config = tiles.PrefillAttentionTiles(16, 16, 4 if DEVICE.type == "cuda" else 1, 1)
    max_query_len = int((starts[1:] - starts[:-1]).max())
    return prefill_attention(q, k, v, tables, seq_lens, starts, scale, window, max_query_len=max_query_len,
                             config=config)


def reference_op(q, k, v, tables, seq_lens, starts, scale, window):
    return reference.paged_attention(q, k, v, tables, seq_lens, starts, scale, window)


# (name, heads, KV heads, head dim, block size, new tokens per sequence, context lengths)
DECODE = ("decode", 4, 2, 16, 4, [1, 1, 1, 1], [1, 6, 13, 3])
MIXED = ("prefill_with_decode_rows", 4, 2, 16, 4, [5, 1, 3, 1], [7, 10, 3, 2])
OPS = {"reference": reference_op, "decode_kernel": decode_kernel(1), "decode_kernel_splits": decode_kernel(3),
       "prefill_kernel": prefill_kernel}


@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
@pytest.mark.parametrize("op,case", [("reference", DECODE), ("reference", MIXED), ("decode_kernel", DECODE),
                                     ("decode_kernel_splits", DECODE), ("prefill_kernel", DECODE),
                                     ("prefill_kernel", MIXED)], ids=lambda x: x if isinstance(x, str) else x[0])
def test_rows_past_the_length_are_not_read(op, case, window):
    _, heads, kv_heads, head_dim, block_size, q_lens, contexts = case
    q, pool, tables, seq_lens, starts, poison = make_step(q_lens, contexts, heads, kv_heads, head_dim, block_size)
    args = (tables.to(DEVICE), seq_lens.to(DEVICE), starts.to(DEVICE), head_dim ** -0.5, window)
    clean = OPS[op](q.to(DEVICE), *kv_views(pool, block_size, kv_heads, head_dim), *args)
    got = OPS[op](q.to(DEVICE), *kv_views(poison(pool), block_size, kv_heads, head_dim), *args)
    assert bool(torch.isfinite(clean).all())
    bad_rows = (~torch.isfinite(got)).flatten(1).any(1).nonzero().flatten().tolist()
    assert not bad_rows, f"non-finite output in token rows {bad_rows}"
    assert torch.equal(got, clean)
