"""Paged decode and prefill attention against kernels.reference.paged_attention.

K/V live in the pool's per-layer views (page stride L * PAGE, not contiguous across pages) on
pages scattered in random or reverse order. Without CUDA the kernels run in the Triton
interpreter at small shapes in float32; `gpu` cases use real head counts and contexts.
"""
from __future__ import annotations

import pytest
import torch

from kernels import reference, tiles
from kernels.paged_attention import attention, paged_decode_attention
from kernels.prefill_attention import prefill_attention

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if ON_GPU else [torch.float32]
# dtype -> (max ||out - ref|| / ||ref||, max |out - ref| as a fraction of max |ref|)
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.5e-2, 5e-2)}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    rel_tol, abs_frac = TOLERANCE[dtype]
    assert not out.isnan().any(), "NaN in output: an element was not written"
    out64, ref64 = out.double(), ref.double()
    rel = (out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)
    assert rel <= rel_tol, f"relative error {rel:.2e} > {rel_tol:.0e}"
    worst = (out64 - ref64).abs().max() / ref64.abs().max().clamp_min(1e-30)
    assert worst <= abs_frac, f"max error {worst:.2e} of max |ref| > {abs_frac:.0e}"


def make_cache(context_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               *, num_layers: int = 3, layer: int = 1, reverse_pages: bool = False, contiguous: bool = False,
               seed: int = 0):
    """Random K/V in the unified pool's layout; returns k_cache, v_cache, block_tables [S, MB] int32."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [max(1, -(-n // block_size)) for n in context_lens]
    num_pages = sum(blocks) + 2
    order = torch.arange(num_pages - 1, -1, -1) if reverse_pages else torch.randperm(num_pages, generator=gen)
    block_tables = torch.zeros(len(context_lens), max(blocks) + 1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(blocks):
        block_tables[s, :n] = order[used:used + n]
        used += n
    shape = (num_pages, 2, block_size, num_kv_heads, head_dim)
    if contiguous:
        kv = torch.randn(shape, generator=gen).to(DEVICE, dtype)
        k_cache, v_cache = kv[:, 0].contiguous(), kv[:, 1].contiguous()
    else:
        page_size = 2 * block_size * num_kv_heads * head_dim
        pool = torch.randn(num_pages, num_layers, page_size, generator=gen).to(DEVICE, dtype)
        kv = pool[:, layer].view(shape)
        k_cache, v_cache = kv[:, 0], kv[:, 1]  # [P, BS, KVH, D], page stride L * PAGE
    return k_cache, v_cache, block_tables.to(DEVICE)


def make_step(q_lens: list[int], context_lens: list[int], num_heads: int, head_dim: int, dtype: torch.dtype,
              seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(DEVICE, dtype)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return (q, torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
            torch.tensor(starts, dtype=torch.int32, device=DEVICE))


def check(q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, window=None,
          decode_config=None, prefill_config=None, **cache_kwargs):
    k_cache, v_cache, block_tables = make_cache(context_lens, block_size, num_kv_heads, head_dim, dtype, **cache_kwargs)
    q, seq_lens, query_start_loc = make_step(q_lens, context_lens, num_heads, head_dim, dtype)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    if max(q_lens, default=0) <= 1 and decode_config is not None:
        paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, window,
                               config=decode_config, out=out)
    elif prefill_config is not None:
        prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, window,
                          max_query_len=max(q_lens), config=prefill_config, out=out)
    else:
        attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, window,
                  max(q_lens, default=1), out=out)
    ref = reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, window)
    if q.shape[0]:
        assert_close(out, ref, dtype)


# (name, heads, KV heads, head dim, block size, context lengths)
DECODE_CASES = [
    ("mha_d16", 2, 2, 16, 4, [1, 4, 13]),
    ("gqa3_d24", 6, 2, 24, 8, [1, 30, 64, 7]),
    ("gqa4_d32_bs16", 8, 2, 32, 16, [40, 17]),
    ("gqa8_d64_long", 16, 2, 64, 16, [100, 3, 161]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c[0])
def test_decode_matches_reference(case, num_splits, window, dtype):
    _, heads, kv_heads, head_dim, block_size, contexts = case
    config = tiles.DecodeAttentionTiles(16, num_splits, 4 if ON_GPU else 1, 1)
    check([1] * len(contexts), contexts, heads, kv_heads, head_dim, block_size, dtype, window, decode_config=config)


def test_decode_default_tiles_contiguous_cache_reverse_pages():
    check([1, 1], [23, 9], 4, 1, 16, 4, DTYPES[0], reverse_pages=True, contiguous=True)


# (name, heads, KV heads, head dim, block size, new tokens per sequence, context lengths)
PREFILL_CASES = [
    ("from_zero", 2, 1, 16, 4, [17, 5], [17, 5]),
    ("chunked_with_prefix", 6, 2, 24, 8, [9, 1, 20, 3], [30, 12, 20, 3]),  # q_len 1 rows mixed in
    ("mha_d40", 3, 3, 40, 16, [33], [50]),
    ("gqa4_long_chunk", 8, 2, 32, 4, [70, 2], [90, 2]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 6], ids=["full", "window6"])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: c[0])
def test_prefill_matches_reference(case, window, dtype):
    _, heads, kv_heads, head_dim, block_size, q_lens, contexts = case
    config = tiles.PrefillAttentionTiles(16, 16, 4 if ON_GPU else 1, 1)
    check(q_lens, contexts, heads, kv_heads, head_dim, block_size, dtype, window, prefill_config=config)


def test_dispatcher_and_empty_batch():
    check([3, 2], [10, 2], 4, 2, 16, 4, DTYPES[0])  # prefill path, default tiles
    check([1, 1, 1], [5, 1, 9], 4, 2, 16, 4, DTYPES[0])  # decode path, default tiles
    k_cache, v_cache, block_tables = make_cache([4], 4, 2, 16, DTYPES[0])
    q = torch.empty(0, 4, 16, device=DEVICE)
    seq_lens = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    starts = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out = attention(q, k_cache, v_cache, block_tables[:0], seq_lens, starts, 0.25, None, 1)
    assert out.shape == (0, 4, 16)


def test_rejects_bad_arguments():
    k_cache, v_cache, block_tables = make_cache([4], 4, 2, 16, torch.float32)
    q, seq_lens, starts = make_step([1], [4], 3, 16, torch.float32)
    with pytest.raises(ValueError, match="not a multiple of 2 KV heads"):
        attention(q, k_cache, v_cache, block_tables, seq_lens, starts, 0.25, None, 1)
    q, seq_lens, starts = make_step([1], [4], 4, 16, torch.float32)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        attention(q, k_cache, v_cache, block_tables.long(), seq_lens, starts, 0.25, None, 1)


# real shapes, GPU only: (name, heads, KV heads, head dim, new tokens per sequence, context lengths, window)
GPU_CASES = [
    ("llama3_decode_batch", 32, 8, 128, [1] * 64, [int(x) for x in torch.randint(1, 4097, (64,),
                                                   generator=torch.Generator().manual_seed(0))], None),
    ("decode_32k_split", 32, 8, 128, [1, 1], [32768, 20000], None),
    ("qwen2_7b_decode_gqa7", 28, 4, 128, [1] * 5, [100, 2000, 1, 513, 4096], None),
    ("mistral_window_decode", 32, 8, 128, [1] * 4, [5000, 4096, 100, 4097], 4096),
    ("d64_mha_decode", 16, 16, 64, [1] * 8, [1, 2, 3, 64, 65, 1000, 3000, 77], None),
    ("prefill_2048", 32, 8, 128, [2048], [2048], None),
    ("chunked_prefill_mixed", 32, 8, 128, [512, 1, 1, 300], [1536, 700, 40, 300], None),
    ("prefill_window", 32, 8, 128, [1000, 37], [3000, 37], 512),
    ("prefill_d64_qwen2_0p5b", 14, 2, 64, [129, 500], [129, 900], None),
]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c[0])
def test_attention_real_shapes(case, dtype):
    _, heads, kv_heads, head_dim, q_lens, contexts, window = case
    check(q_lens, contexts, heads, kv_heads, head_dim, 16, dtype, window)
