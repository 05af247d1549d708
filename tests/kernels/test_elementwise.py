"""fused_add_rms_norm / rotary_and_write_kv / silu_and_mul against their twins in kernels.reference.

Without CUDA the kernels run in the Triton interpreter (float32 and float16; its bfloat16 is not
faithful); on a GPU the same cases run compiled, and the `gpu` cases add real model shapes.
The kernels round where the twins round, so fp16/bf16 may differ only by one ulp from exp/rsqrt.
"""
from __future__ import annotations

import pytest
import torch

from engine.rope import RotaryCache
from kernels import reference
from kernels.elementwise import fused_add_rms_norm, rotary_and_write_kv, silu_and_mul
from kernels.tiles import SILU_BLOCK_N

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# dtype -> (rtol, atol): rtol = the dtype's eps, i.e. one ulp (up to two just below a power of two)
TOLERANCE = {torch.float32: (1e-6, 1e-6), torch.float16: (2 ** -10, 1e-5), torch.bfloat16: (2 ** -7, 1e-4)}
# On the GPU the compiler contracts a*b + c*d into FMAs where torch rounds each product: results
# near zero then differ by an ulp of the operands (values here are about 1), not of the result.
GPU_TOLERANCE = {torch.float16: (2 ** -9, 2 ** -10), torch.bfloat16: (2 ** -6, 2 ** -7)}


def assert_close(out: torch.Tensor, ref: torch.Tensor, gpu: bool = ON_GPU) -> None:
    rtol, atol = (GPU_TOLERANCE if gpu else {}).get(ref.dtype, TOLERANCE[ref.dtype])
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["first_layer", "residual"])
@pytest.mark.parametrize("hidden", [64, 96])
@pytest.mark.parametrize("num_tokens", [0, 1, 5, 33])
def test_add_rms_norm(num_tokens, hidden, with_residual, dtype):
    x = randn(num_tokens, hidden, dtype=dtype, seed=0)
    residual = randn(num_tokens, hidden, dtype=dtype, seed=1) * 4 if with_residual else None
    weight = randn(hidden, dtype=dtype, seed=2)
    inputs = [t.clone() for t in (x, residual) if t is not None]
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_normed, ref_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert_close(normed, ref_normed)
    assert torch.equal(new_residual, ref_residual)  # one rounding of the same sum: exact
    assert (new_residual is x) == (residual is None)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (t for t in (x, residual) if t is not None)))


def test_add_rms_norm_strided_rows():
    wide = randn(5, 100, dtype=torch.float32, seed=3)
    x, residual, weight = wide[:, :80], wide[:, 10:90], randn(80, dtype=torch.float32, seed=4)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
    ref_normed, ref_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert_close(normed, ref_normed)
    assert torch.equal(new_residual, ref_residual)


def make_kv_pool(num_pages: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> torch.Tensor:
    # the unified pool [P, L, PAGE] of random data; a page holds one layer's K then V block
    page_size = 2 * block_size * num_kv_heads * head_dim
    return randn(num_pages, num_layers, page_size, dtype=dtype, seed=5)


def kv_views(pool: torch.Tensor, layer: int, block_size: int, num_kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    # as ModelRunner._kv_views: each [P, BS, KVH, D], page stride L * PAGE
    kv = pool[:, layer].view(pool.shape[0], 2, block_size, num_kv_heads, head_dim)
    return kv[:, 0], kv[:, 1]


def check_rotary(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 block_size: int = 4, num_pages: int = 12, row_padding: int = 0, gpu: bool = ON_GPU) -> None:
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    width = q_size + 2 * kv_size
    qkv = randn(num_tokens, width + row_padding, dtype=dtype, seed=6)[:, :width]  # [T, q + 2kv]
    gen = torch.Generator().manual_seed(7)
    positions = torch.randint(0, 64, (num_tokens,), generator=gen).to(DEVICE)
    cos, sin = RotaryCache(head_dim, 10000.0, None, 64, DEVICE, dtype).lookup(positions)  # [T, D]
    slots = torch.randperm(num_pages * block_size, generator=gen)[:num_tokens].to(DEVICE)  # [T] distinct
    pool = make_kv_pool(num_pages, 3, block_size, num_kv_heads, head_dim, dtype)
    pools = {"kernel": pool.clone(), "twin": pool.clone()}
    q = {}
    for name, fn in (("kernel", rotary_and_write_kv), ("twin", reference.rotary_and_write_kv)):
        k_cache, v_cache = kv_views(pools[name], 1, block_size, num_kv_heads, head_dim)
        q[name] = fn(qkv, cos, sin, q_size, kv_size, num_heads, num_kv_heads, head_dim, k_cache, v_cache, slots)
    assert q["kernel"].shape == (num_tokens, num_heads, head_dim)
    assert_close(q["kernel"], q["twin"], gpu)
    assert_close(pools["kernel"], pools["twin"], gpu)
    written = torch.zeros(pool.shape, dtype=torch.bool, device=DEVICE)  # the slots' K and V rows
    k_mark, v_mark = kv_views(written, 1, block_size, num_kv_heads, head_dim)
    blocks, offsets = slots // block_size, slots % block_size
    k_mark[blocks, offsets] = True
    v_mark[blocks, offsets] = True
    assert torch.equal(pools["kernel"][~written], pool[~written])  # untouched elsewhere
    v_kernel = kv_views(pools["kernel"], 1, block_size, num_kv_heads, head_dim)[1][blocks, offsets]
    assert torch.equal(v_kernel, qkv[:, q_size + kv_size:].reshape(num_tokens, num_kv_heads, head_dim))  # copied


# (tokens, heads, KV heads, head dim): every small combination, and 33 tokens (slow in the interpreter) twice
ROTARY_CASES = [(t, h, kvh, d) for t in (0, 1, 5) for h, kvh in ((4, 2), (4, 4)) for d in (16, 32, 64)]
ROTARY_CASES += [(33, 4, 2, 32), (33, 4, 4, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROTARY_CASES, ids=lambda c: "t{}_h{}_kv{}_d{}".format(*c))
def test_rotary_and_write_kv(case, dtype):
    check_rotary(*case, dtype)


def test_rotary_odd_half_strided_rows_block_size_8():
    check_rotary(5, 3, 1, 20, torch.float32, block_size=8, num_pages=3, row_padding=7)


def test_rotary_rejects_mismatched_sizes():
    pool = make_kv_pool(2, 1, 4, 2, 16, torch.float32)
    k_cache, v_cache = kv_views(pool, 0, 4, 2, 16)
    qkv = randn(1, 128, dtype=torch.float32, seed=8)
    cos = sin = randn(1, 16, dtype=torch.float32, seed=9)
    slots = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit 4 q heads"):
        rotary_and_write_kv(qkv[:, :120], cos, sin, 64, 32, 4, 2, 16, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="share one dtype"):
        rotary_and_write_kv(qkv, cos.double(), sin, 64, 32, 4, 2, 16, k_cache, v_cache, slots)


# (tokens, intermediate size): the last spans two column blocks
SILU_CASES = [(t, i) for t in (0, 1, 5, 33) for i in (64, 80)] + [(2, SILU_BLOCK_N + 76)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SILU_CASES, ids=lambda c: "t{}_i{}".format(*c))
def test_silu_and_mul(case, dtype):
    num_tokens, inter = case
    gate_up = randn(num_tokens, 2 * inter, dtype=dtype, seed=10) * 3
    out = silu_and_mul(gate_up)
    assert_close(out, reference.silu_and_mul(gate_up))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["first_layer", "residual"])
def test_delta_is_added_first(with_residual, dtype):
    # each op with a delta (a projection's deferred LoRA term) equals its twin with that delta, and the twin
    # equals the op on the rounded sum, as if the LoRA had been added into its input in place
    num_tokens, hidden, heads, kv_heads, head_dim, inter = 5, 64, 4, 2, 16, 80
    x, delta = randn(num_tokens, hidden, dtype=dtype, seed=20), randn(num_tokens, hidden, dtype=dtype, seed=21) / 8
    residual = randn(num_tokens, hidden, dtype=dtype, seed=22) if with_residual else None
    weight = randn(hidden, dtype=dtype, seed=23)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5, delta)
    ref_normed, ref_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-5, delta)
    assert_close(normed, ref_normed)
    assert torch.equal(new_residual, ref_residual)
    assert torch.equal(ref_residual, reference.fused_add_rms_norm(x + delta, residual, weight, 1e-5)[1])
    assert not torch.equal(new_residual, fused_add_rms_norm(x, residual, weight, 1e-5)[1])

    gate_up, gu_delta = randn(num_tokens, 2 * inter, dtype=dtype, seed=24), randn(num_tokens, 2 * inter,
                                                                                  dtype=dtype, seed=25)
    assert_close(silu_and_mul(gate_up, gu_delta), reference.silu_and_mul(gate_up + gu_delta))
    assert torch.equal(reference.silu_and_mul(gate_up, gu_delta), reference.silu_and_mul(gate_up + gu_delta))

    width = (heads + 2 * kv_heads) * head_dim
    qkv, qkv_delta = randn(num_tokens, width, dtype=dtype, seed=26), randn(num_tokens, width, dtype=dtype, seed=27)
    positions = torch.arange(num_tokens, device=DEVICE) * 3
    cos, sin = RotaryCache(head_dim, 10000.0, None, 64, DEVICE, dtype).lookup(positions)
    slots = torch.arange(num_tokens, device=DEVICE) * 2 + 1
    pool = make_kv_pool(4, 1, 4, kv_heads, head_dim, dtype)
    outs = {}
    for name, fn, args in (("kernel", rotary_and_write_kv, (qkv, qkv_delta)),
                           ("twin", reference.rotary_and_write_kv, (qkv, qkv_delta)),
                           ("summed", reference.rotary_and_write_kv, (qkv + qkv_delta, None))):
        cache = pool.clone()
        k_cache, v_cache = kv_views(cache, 0, 4, kv_heads, head_dim)
        q = fn(args[0], cos, sin, heads * head_dim, kv_heads * head_dim, heads, kv_heads, head_dim, k_cache, v_cache,
               slots, args[1])
        outs[name] = (q, cache)
    assert_close(outs["kernel"][0], outs["twin"][0])
    assert_close(outs["kernel"][1], outs["twin"][1])  # rotated k, and v with its delta, in the cache
    assert all(torch.equal(a, b) for a, b in zip(outs["twin"], outs["summed"]))


def test_delta_must_match_its_input():
    x = randn(3, 64, dtype=torch.float32, seed=30)
    with pytest.raises(ValueError, match="delta .* must be like its input"):
        fused_add_rms_norm(x, x, x[0], 1e-5, x[:2])
    with pytest.raises(ValueError, match="delta .* must be like its input"):
        silu_and_mul(x, x.half())


# real shapes, GPU only: (name, tokens, hidden, heads, KV heads, head dim, intermediate)
GPU_CASES = [
    ("llama2_7b_decode", 64, 4096, 32, 32, 128, 11008),
    ("llama3_8b_prefill", 1000, 4096, 32, 8, 128, 14336),
    ("llama2_70b_decode", 8, 8192, 64, 8, 128, 28672),
]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c[0])
def test_real_shapes(case, dtype):
    _, num_tokens, hidden, heads, kv_heads, head_dim, inter = case
    x, residual = randn(num_tokens, hidden, dtype=dtype, seed=0), randn(num_tokens, hidden, dtype=dtype, seed=1)
    weight = randn(hidden, dtype=dtype, seed=2)
    normed, _ = fused_add_rms_norm(x, residual, weight, 1e-5)
    assert_close(normed, reference.fused_add_rms_norm(x, residual, weight, 1e-5)[0], gpu=True)
    check_rotary(num_tokens, heads, kv_heads, head_dim, dtype, block_size=16, num_pages=-(-num_tokens // 16) + 2,
                 gpu=True)
    gate_up = randn(num_tokens, 2 * inter, dtype=dtype, seed=3)
    assert_close(silu_and_mul(gate_up), reference.silu_and_mul(gate_up), gpu=True)
