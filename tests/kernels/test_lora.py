"""lora_shrink / lora_expand against their twins in kernels.reference.

Without CUDA the kernels run in the Triton interpreter (tests/kernels/conftest.py) at small
shapes in float32; on a GPU the same cases run compiled in fp16/bf16/fp32, and the `gpu` cases
add real model shapes.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import reference, tiles
from kernels.lora_expand import lora_expand
from kernels.lora_meta import LoRAStepMeta
from kernels.lora_shrink import lora_shrink

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if ON_GPU else [torch.float32]
# dtype -> (max ||out - ref|| / ||ref||, max |out - ref| as a fraction of max |ref|)
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.5e-2, 5e-2)}


@dataclasses.dataclass
class AdapterPool:
    pool: torch.Tensor  # [P, L, PAGE]
    page_tables: torch.Tensor  # [NS, MP] int32
    ranks: torch.Tensor  # [NS, NPROJ] int32
    a_offsets: torch.Tensor  # [NS, NPROJ] int64
    b_offsets: torch.Tensor  # [NS, NPROJ] int64
    scales: torch.Tensor  # [NS, NPROJ] float32


def make_adapter_pool(ranks: list[list[int]], k: int, out_sizes: list[int], page_size: int, num_layers: int,
                      dtype: torch.dtype, *, align: int = 8, reverse_pages: bool = False,
                      seed: int = 0) -> AdapterPool:
    """Adapters packed like the engine packs them (per projection A then B^T, rank-exact), on pages
    scattered over a pool of random data. align=1 starts rows at odd offsets (unaligned path)."""
    gen = torch.Generator().manual_seed(seed)
    num_slots, num_proj = len(ranks), len(out_sizes)
    a_off = torch.zeros(num_slots, num_proj, dtype=torch.int64)
    b_off = torch.zeros_like(a_off)
    pages_needed = []
    for s in range(num_slots):
        offset = 0 if align > 1 else 3
        for p in range(num_proj):
            a_off[s, p] = offset
            offset += -(-ranks[s][p] * k // align) * align
            b_off[s, p] = offset
            offset += -(-ranks[s][p] * out_sizes[p] // align) * align
        pages_needed.append(max(1, -(-offset // page_size)))
    num_pages = sum(pages_needed) + 3  # spare pages hold garbage nobody may read
    order = torch.randperm(num_pages, generator=gen)
    if reverse_pages:
        order = torch.arange(num_pages - 1, -1, -1)
    page_tables = torch.zeros(num_slots, max(pages_needed), dtype=torch.int32)
    used = 0
    for s, n in enumerate(pages_needed):
        page_tables[s, :n] = order[used:used + n]
        used += n
    # unit-variance z and O(1) updates: A entries ~ 1/sqrt(K), B^T entries ~ 1/sqrt(rank)
    pool = torch.randn(num_pages, num_layers, page_size, generator=gen) / max(k, 16) ** 0.5
    scales = torch.rand(num_slots, num_proj, generator=gen) + 0.5
    ranks_t = torch.tensor(ranks, dtype=torch.int32)
    return AdapterPool(pool.to(DEVICE, dtype), page_tables.to(DEVICE), ranks_t.to(DEVICE), a_off.to(DEVICE),
                       b_off.to(DEVICE), scales.to(DEVICE))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    rel_tol, abs_frac = TOLERANCE[dtype]
    assert not out.isnan().any(), "NaN in output: an element was not written"
    out64, ref64 = out.double(), ref.double()
    scale = ref64.abs().max().clamp_min(1e-30)
    rel = (out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)
    assert rel <= rel_tol, f"relative error {rel:.2e} > {rel_tol:.0e}"
    worst = (out64 - ref64).abs().max() / scale
    assert worst <= abs_frac, f"max error {worst:.2e} of max |ref| > {abs_frac:.0e}"


def run_and_compare(ap: AdapterPool, token_slots: list[int], k: int, out_sizes: list[int], out_offsets: list[int],
                    n_total: int, layer: int, dtype: torch.dtype, meta_block_m: int | None = None,
                    shrink_config: tiles.ShrinkTiles | None = None,
                    expand_config: tiles.ExpandTiles | None = None, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_tokens, num_proj = len(token_slots), len(out_sizes)
    r_max = max(1, int(ap.ranks.max()))
    slots = torch.tensor(token_slots, dtype=torch.int32, device=DEVICE)
    x = torch.randn(num_tokens, k, generator=gen).to(DEVICE, dtype)
    meta = None
    if meta_block_m is not None:
        meta = LoRAStepMeta.build(slots, ap.page_tables.shape[0], meta_block_m)

    # shrink: z poisoned; rows of tokens with an adapter must be written in full
    z = torch.full((num_tokens, num_proj, r_max), float("nan"), device=DEVICE)
    z_ref = z.clone()
    lora_shrink(x, ap.pool, layer, slots, ap.page_tables, ap.ranks, ap.a_offsets, z, meta=meta, config=shrink_config)
    reference.lora_shrink(x, ap.pool, layer, slots, ap.page_tables, ap.ranks, ap.a_offsets, z_ref)
    has_adapter = slots >= 0
    if has_adapter.any():
        assert_close(z[has_adapter], z_ref[has_adapter], dtype)
    # the engine's two z buffers: a shrink told that z starts at zero skips its memset and gives the same z
    z_pre = torch.zeros_like(z)
    lora_shrink(x, ap.pool, layer, slots, ap.page_tables, ap.ranks, ap.a_offsets, z_pre, meta=meta,
                config=shrink_config, z_zeroed=True)
    if has_adapter.any():
        assert_close(z_pre[has_adapter], z_ref[has_adapter], dtype)

    # expand from the reference z, into a y whose other rows and columns must stay untouched
    y = torch.randn(num_tokens, n_total, generator=gen).to(DEVICE, dtype)
    y_ref = y.clone()
    y_before = y.clone()
    # zero_after: the entries z[t, p, :r] that the expand reads are zeroed in the other buffer, nothing else
    z_next = torch.full_like(z_ref, 7.0)
    z_next_ref = z_next.clone()
    lora_expand(z_ref, ap.pool, layer, slots, ap.page_tables, ap.ranks, ap.b_offsets, ap.scales, y,
                out_offsets, out_sizes, meta=meta, config=expand_config, zero_after=z_next)
    reference.lora_expand(z_ref, ap.pool, layer, slots, ap.page_tables, ap.ranks, ap.b_offsets, ap.scales, y_ref,
                          out_offsets, out_sizes, zero_after=z_next_ref)
    assert torch.equal(z_next, z_next_ref), "zero_after zeroed other entries than the twin"
    read = torch.arange(r_max, device=DEVICE)[None, None, :] < ap.ranks[slots.long().clamp(min=0)][:, :, None]
    read &= has_adapter[:, None, None]
    assert (z_next[read] == 0).all() and (z_next[~read] == 7.0).all()
    if num_tokens:
        assert_close(y, y_ref, dtype)
        assert torch.equal(y[~has_adapter], y_before[~has_adapter]), "rows without an adapter changed"
        covered = torch.zeros(n_total, dtype=torch.bool, device=DEVICE)
        for off, n in zip(out_offsets, out_sizes):
            covered[off:off + n] = True
        assert torch.equal(y[:, ~covered], y_before[:, ~covered]), "columns outside the projections changed"

        # storing (a LoRA delta, deferred or the base GEMM's addend): every covered column of every row
        # written, zeros for a module the adapter lacks and for tokens without an adapter; nothing else touched
        d = torch.full_like(y, float("nan"))
        d_ref = d.clone()
        lora_expand(z_ref, ap.pool, layer, slots, ap.page_tables, ap.ranks, ap.b_offsets, ap.scales, d,
                    out_offsets, out_sizes, meta=meta, config=expand_config, accumulate=False)
        reference.lora_expand(z_ref, ap.pool, layer, slots, ap.page_tables, ap.ranks, ap.b_offsets, ap.scales, d_ref,
                              out_offsets, out_sizes, accumulate=False)
        rows = has_adapter.nonzero().flatten()
        if rows.numel():
            assert_close(d[rows][:, covered], d_ref[rows][:, covered], dtype)
        # the pair as the engine launches it: the expand started while its shrink runs (pdl, on a GPU that
        # has programmatic dependent launch) reads the z that the shrink finished
        z_pre.zero_()
        lora_shrink(x, ap.pool, layer, slots, ap.page_tables, ap.ranks, ap.a_offsets, z_pre, meta=meta,
                    config=shrink_config, z_zeroed=True)
        d_pdl = torch.full_like(y, float("nan"))
        lora_expand(z_pre, ap.pool, layer, slots, ap.page_tables, ap.ranks, ap.b_offsets, ap.scales, d_pdl,
                    out_offsets, out_sizes, meta=meta, config=expand_config, accumulate=False, pdl=True)
        if rows.numel():
            assert_close(d_pdl[rows][:, covered], d_ref[rows][:, covered], dtype)
        assert d_pdl[:, ~covered].isnan().all() and (d_pdl[~has_adapter][:, covered] == 0).all()
        assert d[:, ~covered].isnan().all(), "stored outside the projections' columns"
        assert (d[~has_adapter][:, covered] == 0).all() and (d_ref[~has_adapter][:, covered] == 0).all(), \
            "a token without an adapter must store zeros"
        absent = torch.zeros_like(d_ref, dtype=torch.bool)
        for p, (off, n) in enumerate(zip(out_offsets, out_sizes)):
            absent[:, off:off + n] = (ap.ranks[slots.long().clamp(min=0), p] == 0)[:, None] & has_adapter[:, None]
        assert (d[absent] == 0).all(), "a module the adapter lacks must store zeros"


def decode_slots(num_tokens: int, num_slots: int, seed: int, none_every: int = 5) -> list[int]:
    """Tokens in random order over random adapters; every none_every-th token has none."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randint(0, num_slots, (num_tokens,), generator=gen).tolist()
    return [-1 if none_every and i % none_every == none_every - 1 else s for i, s in enumerate(slots)]


def segment_slots(lengths: list[int], slots: list[int]) -> list[int]:
    """Prefill-like: contiguous runs of one adapter (-1 runs allowed)."""
    return [s for n, s in zip(lengths, slots) for _ in range(n)]


# (name, ranks per slot and projection, K, out_sizes, page size, token slots)
CASES = [
    ("one_token", [[7]], 33, [40], 48, [0]),
    ("qkv_mixed_ranks", [[3, 16, 1], [0, 7, 7], [17, 1, 0], [33, 33, 33], [1, 2, 5]], 80, [48, 24, 24], 64,
     decode_slots(37, 5, seed=2)),
    ("gate_up_segments", [[16, 16], [5, 5], [1, 1], [9, 0]], 130, [96, 96], 40,
     segment_slots([20, 1, 17, 3, 1, 22], [0, 1, 2, -1, 3, 0])),
    ("rank_128", [[128], [65]], 33, [24], 56, decode_slots(9, 2, seed=3, none_every=0)),
    ("many_adapters", [[1, 2], [8, 0], [16, 16], [31, 5], [64, 64], [2, 1], [3, 3], [0, 9], [12, 12], [7, 1],
                       [5, 5], [33, 2]], 64, [40, 72], 64, decode_slots(61, 12, seed=8)),
    ("rows_within_pages", [[16], [5], [20]], 48, [96], 128, segment_slots([3, 30, 1, 1, 9], [2, 0, 1, -1, 2])),
    ("no_adapter_tokens", [[4]], 33, [40], 48, [-1, -1, -1]),
    ("empty_batch", [[4]], 33, [40], 48, []),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_lora_matches_reference(case, dtype):
    _, ranks, k, out_sizes, page_size, token_slots = case
    # projections laid side by side with a gap before the first, which must stay untouched
    out_offsets = [8 + sum(out_sizes[:j]) for j in range(len(out_sizes))]
    ap = make_adapter_pool(ranks, k, out_sizes, page_size, num_layers=3, dtype=dtype)
    run_and_compare(ap, token_slots, k, out_sizes, out_offsets, 8 + sum(out_sizes) + 5, layer=1, dtype=dtype)


@pytest.mark.parametrize("variant", ["split_k", "prefill_tiles", "unaligned_reversed"])
def test_lora_tile_paths(variant):
    """The atomic split-K path, BLOCK_M = 64 tiles, and rows at unaligned offsets on pages in reverse."""
    dtype = DTYPES[-1]
    ranks, k, out_sizes = [[16, 8], [3, 33], [1, 1]], 80, [40, 56]
    token_slots = segment_slots([70, 1, 9, 2], [0, 1, -1, 2])
    kwargs = {}
    if variant == "split_k":
        kwargs = dict(shrink_config=tiles.ShrinkTiles(16, 16, 3, 1, 1))
    elif variant == "prefill_tiles":
        kwargs = dict(meta_block_m=64, shrink_config=tiles.ShrinkTiles(32, 64, 2, 4, 1),
                      expand_config=tiles.ExpandTiles(32, 3, 4, 1))
    ap = make_adapter_pool(ranks, k, out_sizes, 48, num_layers=2, dtype=dtype,
                           align=1 if variant == "unaligned_reversed" else 8,
                           reverse_pages=variant == "unaligned_reversed")
    run_and_compare(ap, token_slots, k, out_sizes, [0, 40], 96, layer=0, dtype=dtype, **kwargs)


def test_meta_groups_tokens_by_slot():
    token_slots = torch.tensor(segment_slots([5, 1, 40, 3], [2, -1, 0, 2]), dtype=torch.int32, device=DEVICE)
    meta = LoRAStepMeta.build(token_slots, num_slots=4, block_m=16)
    seen = []
    for start, length, slot in zip(meta.tile_starts.tolist(), meta.tile_lens.tolist(), meta.tile_slots.tolist()):
        if length == 0:
            continue
        assert 0 < length <= 16
        tokens = meta.sorted_token_ids[start:start + length]
        assert (token_slots[tokens.long()] == slot).all()
        if slot >= 0:
            seen += tokens.tolist()
    assert sorted(seen) == [i for i, s in enumerate(token_slots.tolist()) if s >= 0]


def test_launchers_reject_bad_arguments():
    ap = make_adapter_pool([[4]], 32, [16], 32, num_layers=1, dtype=torch.float32)
    slots = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    x = torch.randn(2, 32, device=DEVICE)
    z = torch.zeros(2, 1, 4, device=DEVICE)
    with pytest.raises(ValueError, match="a_offsets must be a contiguous int64"):
        lora_shrink(x, ap.pool, 0, slots, ap.page_tables, ap.ranks, ap.a_offsets.int(), z)
    with pytest.raises(ValueError, match="layer 1 out of range"):
        lora_shrink(x, ap.pool, 1, slots, ap.page_tables, ap.ranks, ap.a_offsets, z)
    with pytest.raises(ValueError, match="z must be a contiguous float32"):
        lora_shrink(x, ap.pool, 0, slots, ap.page_tables, ap.ranks, ap.a_offsets, z.half())
    y = torch.zeros(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit y"):
        lora_expand(z, ap.pool, 0, slots, ap.page_tables, ap.ranks, ap.b_offsets, ap.scales, y, [8], [16])


# real model shapes, GPU only: (name, K, out_sizes, ranks per slot, token slots)
GPU_CASES = [
    ("decode_up_64_adapters", 4096, [11008], [[16]] * 64, decode_slots(128, 64, seed=4)),
    ("decode_down_2049", 11008, [4096], [[16], [64], [128], [1]], decode_slots(65, 4, seed=5)),
    ("decode_qkv_mixed", 4096, [4096, 1024, 1024], [[16, 16, 16], [64, 0, 64], [128, 8, 1]] * 3,
     decode_slots(300, 9, seed=6)),
    ("odd_hidden_2049", 2049, [2049], [[13], [64]], decode_slots(33, 2, seed=7, none_every=0)),
    ("prefill_14336", 14336, [4096], [[16], [64], [32], [128]],
     segment_slots([700, 1, 300, 511, 536], [0, 1, -1, 2, 3])),
    ("prefill_gate_up_2048", 4096, [14336, 14336], [[16, 16]] * 16, segment_slots([128] * 16, list(range(16)))),
    ("single_token", 4096, [4096], [[64]], [0]),
]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c[0])
def test_lora_real_shapes(case, dtype):
    _, k, out_sizes, ranks, token_slots = case
    out_offsets = [sum(out_sizes[:j]) for j in range(len(out_sizes))]
    ap = make_adapter_pool(ranks, k, out_sizes, 2 * 16 * 8 * 128, num_layers=2, dtype=dtype,
                           align=1 if k % 8 else 8)
    run_and_compare(ap, token_slots, k, out_sizes, out_offsets, sum(out_sizes), layer=1, dtype=dtype)
