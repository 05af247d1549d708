"""Argument checks shared by the decode and prefill attention launchers."""
from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_attention_args(name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                         sliding_window: int | None) -> None:
    """Raise ValueError naming the first argument that does not fit; see the launchers for shapes."""
    def fail(msg: str) -> None:
        raise ValueError(f"{name}: {msg}")

    if q.dim() != 3 or q.stride(2) != 1:
        fail(f"q must be [T, H, D] with unit stride along D, got {tuple(q.shape)} strides {q.stride()}")
    if q.dtype not in DTYPES:
        fail(f"q dtype {q.dtype} not supported; use one of {DTYPES}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    for arg, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.stride(3) != 1:
            fail(f"{arg} must be [NB, BS, KVH, D] with unit stride along D, got {tuple(cache.shape)} "
                 f"strides {cache.stride()}")
        if cache.dtype != q.dtype or cache.device != q.device:
            fail(f"{arg} is {cache.dtype} on {cache.device}, q is {q.dtype} on {q.device}")
        if cache.shape[3] != head_dim:
            fail(f"{arg} head dim {cache.shape[3]} != q head dim {head_dim}")
    if k_cache.shape != v_cache.shape:
        fail(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        fail(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != num_seqs \
            or block_tables.stride(1) != 1:
        fail(f"block_tables must be int32 [S, MB] with unit stride along MB and S = len(seq_lens), got "
             f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if seq_lens.dtype != torch.int32 or query_start_loc.dtype != torch.int32:
        fail(f"seq_lens and query_start_loc must be int32, got {seq_lens.dtype} and {query_start_loc.dtype}")
    if query_start_loc.shape != (num_seqs + 1,) or not query_start_loc.is_contiguous() \
            or not seq_lens.is_contiguous():
        fail(f"need contiguous seq_lens [S] and query_start_loc [S+1], got {tuple(seq_lens.shape)} and "
             f"{tuple(query_start_loc.shape)}")
    for arg, t in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if t.device != q.device:
            fail(f"{arg} is on {t.device}, q on {q.device}")
    if sliding_window is not None and sliding_window <= 0:
        fail(f"sliding_window must be positive or None, got {sliding_window}")


def check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """The output buffer: ``out`` if it fits q ([T, H, D], same dtype and device), else a new one."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with unit stride along D, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device} strides {out.stride()}")
    return out
