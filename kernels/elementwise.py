"""Fused element-wise kernels of a layer: residual add + RMSNorm, rotary + KV-cache write, SiLU-and-mul.

Each takes an optional delta, a tensor like its input that is added to the input first (rounded
to the dtype, as the twins' separate add rounds): a projection's LoRA term (engine/lora_batch.py).
Each computes in float32 and rounds to the tensor dtype wherever its twin in kernels.reference
rounds, so fp16/bf16 results equal the twin's up to the last bit of exp/rsqrt (at most 1 ulp).
None reads a tensor on the host: they are captured in the decode CUDA graphs.
Twins: reference.fused_add_rms_norm, reference.rotary_and_write_kv, reference.silu_and_mul.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import pdl_start, pdl_supported
from kernels.tiles import SILU_BLOCK_N, cdiv, elementwise_warps, next_pow2


def _check_rows(name: str, **tensors: torch.Tensor) -> None:
    for arg, t in tensors.items():
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"{name}: {arg} must be 2-D with unit stride along its last dim, got shape "
                             f"{tuple(t.shape)} strides {t.stride()}")


def _check_delta(name: str, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The delta pointer and row stride to pass (x's own, unread, without a delta)."""
    if delta is None:
        return x, 0
    _check_rows(name, delta=delta)
    if delta.shape != x.shape or delta.dtype != x.dtype or delta.device != x.device:
        raise ValueError(f"{name}: delta {tuple(delta.shape)} {delta.dtype} on {delta.device} must be like its input "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    return delta, delta.stride(0)


@triton.jit
def _load_plus(ptr, delta_ptr, offs, mask, HAS_DELTA: tl.constexpr):
    """ptr[offs] (+ delta_ptr[offs], rounded to the dtype) in float32."""
    x = tl.load(ptr + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr, delta_ptr,
                         x_stride_t, residual_stride_t, out_stride_t, new_residual_stride_t, delta_stride_t, H, eps,
                         HAS_RESIDUAL: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_H: tl.constexpr,
                         PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    dtype = out_ptr.dtype.element_ty
    x = _load_plus(x_ptr + t * x_stride_t, delta_ptr + t * delta_stride_t, offs, mask, HAS_DELTA)
    if HAS_RESIDUAL:  # the sum is rounded to the dtype, stored, and normalised as rounded
        r = tl.load(residual_ptr + t * residual_stride_t + offs, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(dtype)
        tl.store(new_residual_ptr + t * new_residual_stride_t + offs, summed, mask=mask)
        x = summed.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    normed = (x * inv_rms).to(dtype)  # rounded before the weight, like Hugging Face's LlamaRMSNorm
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * out_stride_t + offs, (w * normed.to(tl.float32)).to(dtype), mask=mask)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float, delta: torch.Tensor | None = None, *,
                       pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """residual + x, then RMSNorm; returns (normed, new residual), both new tensors.

    x: [T, H] rows unit-stride; residual: [T, H] like x, or None (the new residual is then x itself)
    weight: [H], x's dtype; eps: added to the mean square
    delta: [T, H] like x, added to x first, or None
    pdl: launch with programmatic dependent launch where the device has it (kernels/launch.py)
    """
    _check_rows("fused_add_rms_norm", x=x, **({} if residual is None else {"residual": residual}))
    delta_arg, delta_stride = _check_delta("fused_add_rms_norm", x, delta)
    if delta is not None and residual is None:  # the new residual would be x + delta, a tensor of its own
        x = x + delta
        delta_arg, delta_stride, delta = x, 0, None
    num_tokens, hidden = x.shape
    if weight.shape != (hidden,) or weight.dtype != x.dtype or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"fused_add_rms_norm: x {tuple(x.shape)} {x.dtype}, residual "
                         f"{None if residual is None else tuple(residual.shape)}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}: need residual like x and weight [H] of x's dtype")
    out = torch.empty_like(x)
    new_residual = x if residual is None else torch.empty_like(x)
    pdl = pdl and pdl_supported(x.device)
    if num_tokens == 0:
        return out, new_residual
    block_h = next_pow2(hidden)
    has_residual = residual is not None
    _add_rms_norm_kernel[(num_tokens,)](
        x, residual if has_residual else x, weight, out, new_residual, delta_arg,
        x.stride(0), residual.stride(0) if has_residual else 0, out.stride(0), new_residual.stride(0), delta_stride,
        hidden, eps, HAS_RESIDUAL=has_residual, HAS_DELTA=delta is not None, BLOCK_H=block_h,
        PDL=pdl, num_warps=elementwise_warps(block_h), launch_pdl=pdl,
    )
    return out, new_residual


@triton.jit
def _round_sum(a, b, dtype: tl.constexpr):
    # a + b with a and b first rounded to dtype, as the twin's separate tensor ops round
    return (a.to(dtype).to(tl.float32) + b.to(dtype).to(tl.float32)).to(dtype)


@triton.jit
def _rotary_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_cache_ptr, v_cache_ptr, delta_ptr,
                      qkv_stride_t, cos_stride_t, sin_stride_t, q_stride_t, delta_stride_t,
                      cache_stride_block, cache_stride_offset, cache_stride_head, cache_stride_d,
                      NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_DELTA: tl.constexpr, PDL: tl.constexpr):
    # program (t, h): head h of token t among the q heads then the k heads, adjacent in qkv
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < HALF
    dtype = q_ptr.dtype.element_ty
    row = qkv_ptr + t * qkv_stride_t
    delta_row = delta_ptr + t * delta_stride_t
    x1 = _load_plus(row, delta_row, h * 2 * HALF + offs, mask, HAS_DELTA)
    x2 = _load_plus(row, delta_row, h * 2 * HALF + HALF + offs, mask, HAS_DELTA)
    cos1 = tl.load(cos_ptr + t * cos_stride_t + offs, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + t * cos_stride_t + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + t * sin_stride_t + offs, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + t * sin_stride_t + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    out1 = _round_sum(x1 * cos1, -(x2 * sin1), dtype)  # x * cos + rotate_half(x) * sin
    out2 = _round_sum(x2 * cos2, x1 * sin2, dtype)
    if h < NUM_HEADS:
        dst = q_ptr + t * q_stride_t + h * 2 * HALF
        tl.store(dst + offs, out1, mask=mask)
        tl.store(dst + HALF + offs, out2, mask=mask)
    else:
        kv_head = h - NUM_HEADS
        slot = tl.load(slot_ptr + t).to(tl.int64)
        cache_offset = ((slot // BLOCK_SIZE) * cache_stride_block + (slot % BLOCK_SIZE) * cache_stride_offset
                        + kv_head * cache_stride_head)
        lo, hi = offs * cache_stride_d, (HALF + offs) * cache_stride_d
        tl.store(k_cache_ptr + cache_offset + lo, out1, mask=mask)
        tl.store(k_cache_ptr + cache_offset + hi, out2, mask=mask)
        v_col = (NUM_HEADS + NUM_KV_HEADS + kv_head) * 2 * HALF
        v1 = _load_plus(row, delta_row, v_col + offs, mask, HAS_DELTA)
        v2 = _load_plus(row, delta_row, v_col + HALF + offs, mask, HAS_DELTA)
        tl.store(v_cache_ptr + cache_offset + lo, v1.to(dtype), mask=mask)
        tl.store(v_cache_ptr + cache_offset + hi, v2.to(dtype), mask=mask)


def rotary_and_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_size: int, kv_size: int,
                        num_heads: int, num_kv_heads: int, head_dim: int, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        delta: torch.Tensor | None = None, *, pdl: bool = False) -> torch.Tensor:
    """Rotary (rotate_half) on q and k; rotated k and v into their cache slots; returns rotated q.
    delta: like qkv, added to qkv first, or None.

    qkv: [T, q_size + 2 * kv_size] rows unit-stride, q heads then k heads then v heads
    cos, sin: [T, D] rows unit-stride, halves repeated (Hugging Face layout)
    q_size = num_heads * head_dim; kv_size = num_kv_heads * head_dim; head_dim even
    k_cache, v_cache: [NB, BS, KVH, D] with equal, arbitrary strides (views of the page pool)
    slot_mapping: [T] int, block * BS + offset, all >= 0
    Returns q: [T, num_heads, head_dim] contiguous. All float tensors share one dtype.
    pdl: launch with programmatic dependent launch where the device has it (kernels/launch.py)
    """
    _check_rows("rotary_and_write_kv", qkv=qkv, cos=cos, sin=sin)
    num_tokens = qkv.shape[0]
    if (q_size != num_heads * head_dim or kv_size != num_kv_heads * head_dim or head_dim % 2
            or qkv.shape[1] != q_size + 2 * kv_size or cos.shape != (num_tokens, head_dim) or sin.shape != cos.shape
            or slot_mapping.shape != (num_tokens,)):
        raise ValueError(f"rotary_and_write_kv: qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}, sin "
                         f"{tuple(sin.shape)}, slot_mapping {tuple(slot_mapping.shape)} do not fit {num_heads} "
                         f"q heads, {num_kv_heads} kv heads of even head_dim {head_dim} (q_size {q_size}, "
                         f"kv_size {kv_size})")
    cache_shape = (num_kv_heads, head_dim)
    if (k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != cache_shape or v_cache.shape != k_cache.shape
            or v_cache.stride() != k_cache.stride()):
        raise ValueError(f"rotary_and_write_kv: k_cache {tuple(k_cache.shape)} {k_cache.stride()}, v_cache "
                         f"{tuple(v_cache.shape)} {v_cache.stride()}: need [NB, BS, {num_kv_heads}, {head_dim}] "
                         "with equal strides")
    if len({qkv.dtype, cos.dtype, sin.dtype, k_cache.dtype, v_cache.dtype}) != 1:
        raise ValueError(f"rotary_and_write_kv: qkv {qkv.dtype}, cos {cos.dtype}, sin {sin.dtype}, caches "
                         f"{k_cache.dtype}/{v_cache.dtype} must share one dtype")
    delta_arg, delta_stride = _check_delta("rotary_and_write_kv", qkv, delta)
    q = qkv.new_empty(num_tokens, num_heads, head_dim)
    if num_tokens == 0:
        return q
    half = head_dim // 2
    block_half = next_pow2(half)
    pdl = pdl and pdl_supported(qkv.device)
    _rotary_kv_kernel[(num_tokens, num_heads + num_kv_heads)](
        qkv, cos, sin, slot_mapping, q, k_cache, v_cache, delta_arg,
        qkv.stride(0), cos.stride(0), sin.stride(0), q.stride(0), delta_stride, *k_cache.stride(),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, BLOCK_SIZE=k_cache.shape[1],
        HALF=half, BLOCK_HALF=block_half, HAS_DELTA=delta is not None, PDL=pdl,
        num_warps=elementwise_warps(block_half), launch_pdl=pdl,
    )
    return q


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, delta_ptr, inter_size, gate_up_stride_t, out_stride_t, delta_stride_t,
                         BLOCK_N: tl.constexpr, HAS_DELTA: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < inter_size
    dtype = out_ptr.dtype.element_ty
    row, delta_row = gate_up_ptr + t * gate_up_stride_t, delta_ptr + t * delta_stride_t
    gate = _load_plus(row, delta_row, offs, mask, HAS_DELTA)
    up = _load_plus(row, delta_row, inter_size + offs, mask, HAS_DELTA)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype)  # F.silu's result, rounded as F.silu rounds it
    tl.store(out_ptr + t * out_stride_t + offs, (act.to(tl.float32) * up).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, delta: torch.Tensor | None = None, *, pdl: bool = False) -> torch.Tensor:
    """silu(gate) * up of gate_up = [gate | up]: [T, 2I] rows unit-stride -> [T, I] contiguous;
    delta: like gate_up, added to it first, or None.

    Rounds twice, like F.silu(gate) * up: silu(gate) to the dtype, then the product (computed
    exactly in float32 for fp16/bf16 inputs, so this rounding equals the twin's multiply).
    pdl: launch with programmatic dependent launch where the device has it (kernels/launch.py)
    """
    _check_rows("silu_and_mul", gate_up=gate_up)
    num_tokens, width = gate_up.shape
    if width % 2:
        raise ValueError(f"silu_and_mul: gate_up must be [T, 2I], got width {width}")
    inter = width // 2
    delta_arg, delta_stride = _check_delta("silu_and_mul", gate_up, delta)
    out = gate_up.new_empty(num_tokens, inter)
    if num_tokens == 0 or inter == 0:
        return out
    block_n = min(SILU_BLOCK_N, next_pow2(inter))
    pdl = pdl and pdl_supported(gate_up.device)
    _silu_and_mul_kernel[(num_tokens, cdiv(inter, block_n))](
        gate_up, out, delta_arg, inter, gate_up.stride(0), out.stride(0), delta_stride, BLOCK_N=block_n,
        HAS_DELTA=delta is not None, PDL=pdl, num_warps=elementwise_warps(block_n), launch_pdl=pdl,
    )
    return out
