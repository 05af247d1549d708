"""Pure-torch reference ops: the CPU path of the engine and the twins the Triton kernels are tested against.

Shapes: T = tokens in the step, S = sequences in the step, H/KVH = query/KV heads, D = head dim,
NB = KV blocks in the cache, BS = block size, MB = max blocks per sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, H]; computed in float32 like Hugging Face's LlamaRMSNorm
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_delta(x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """x + delta rounded to x's dtype (a projection's output and its LoRA delta, engine/lora_batch.py)."""
    return x if delta is None else x + delta


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # x, residual, delta: [T, H]; residual None = the first layer (the new residual is x itself);
    # delta (or None): added to x first
    x = add_delta(x, delta)
    residual = x if residual is None else residual + x
    return rms_norm(residual, weight, eps), residual


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos, sin: [T, D] (halves repeated, Hugging Face's rotate_half layout)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the step's keys and values into their cache slots.

    k, v: [T, KVH, D]; k_cache, v_cache: [NB, BS, KVH, D]; slot_mapping: [T] = block * BS + offset.
    """
    block_size = k_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, offsets] = k
    v_cache[blocks, offsets] = v


def rotary_and_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_size: int, kv_size: int,
                        num_heads: int, num_kv_heads: int, head_dim: int, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        delta: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary on q and k of qkv [T, q_size + 2 * kv_size]; rotated k and v into the cache (write_kv).
    delta (like qkv, or None): added to qkv first.

    Returns rotated q: [T, num_heads, head_dim].
    """
    qkv = add_delta(qkv, delta)
    num_tokens = qkv.shape[0]
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    write_kv(apply_rotary(k, cos, sin), v, k_cache, v_cache, slot_mapping)
    return apply_rotary(q, cos, sin)


def silu_and_mul(gate_up: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    # gate_up: [T, 2I] = [gate | up] -> [T, I]; delta (like gate_up, or None): added first
    gate, up = add_delta(gate_up, delta).chunk(2, dim=-1)
    return F.silu(gate) * up


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole context in the paged cache.

    q: [T, H, D], new tokens of S sequences laid end to end (query_start_loc: [S+1]);
    k_cache, v_cache: [NB, BS, KVH, D], already holding the new tokens' K/V;
    block_tables: [S, MB] int; seq_lens: [S] context length including the new tokens.
    The i-th of a sequence's q_len new tokens sits at position seq_len - q_len + i.
    Returns [T, H, D].
    """
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decode = [s for s in range(len(lens)) if starts[s + 1] - starts[s] == 1]
    if decode:
        _decode_batched(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window,
                        decode, out)
    for s, ctx_len in enumerate(lens):
        q_start, q_end = starts[s], starts[s + 1]
        q_len = q_end - q_start
        if q_len <= 1:
            continue
        num_blocks = (ctx_len + block_size - 1) // block_size
        blocks = block_tables[s, :num_blocks].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx_len]  # [ctx, KVH, D]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx_len]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, ctx, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qs = q[q_start:q_end].transpose(0, 1)  # [H, q_len, D]
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]
        k_pos = torch.arange(ctx_len, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        scores = torch.matmul(qs.float(), k.float().transpose(1, 2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.matmul(probs, v.float()).transpose(0, 1).to(q.dtype)
    return out


def _decode_batched(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, sliding_window: int | None,
                    decode: list[int], out: torch.Tensor) -> None:
    """The one-new-token sequences of paged_attention in one batched computation (padded keys)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    seqs = torch.tensor(decode, device=q.device)
    lens = seq_lens.long().index_select(0, seqs)  # [Sd]
    num_blocks = int((lens.max() + block_size - 1) // block_size)
    tables = block_tables.index_select(0, seqs)[:, :num_blocks].long()  # [Sd, MB]
    num_seqs = len(decode)
    k = k_cache[tables].reshape(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2).float()  # [Sd, KVH, N, D]
    v = v_cache[tables].reshape(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2).float()
    rows = query_start_loc.long().index_select(0, seqs)  # the token of each sequence
    qs = q.index_select(0, rows).view(num_seqs, num_kv_heads, group, head_dim).float()  # [Sd, KVH, G, D]
    scores = torch.matmul(qs, k.transpose(2, 3)) * scale  # [Sd, KVH, G, N]
    k_pos = torch.arange(k.shape[2], device=q.device)[None, :]
    mask = k_pos < lens[:, None]  # the query sits at position len - 1
    if sliding_window is not None:
        mask &= k_pos > lens[:, None] - 1 - sliding_window
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # The padded keys are other requests' leftovers (freed pages, the scratch page): a weight of 0
    # times a stale NaN or inf is NaN, so the values themselves are zeroed, not only their scores.
    v = v.masked_fill(~mask[:, None, :, None], 0.0)
    out[rows] = torch.matmul(probs, v).reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def read_paged(pool: torch.Tensor, layer: int, page_table: torch.Tensor, offset: int, num_elements: int) -> torch.Tensor:
    """Elements [offset, offset + num_elements) of an adapter's virtual space in ``layer``.

    pool: [P, L, PAGE]; page_table: [MP] int, the adapter's pages in order. Virtual element v of
    layer l lives at pool[page_table[v // PAGE], l, v % PAGE].
    """
    page_size = pool.shape[2]
    v = torch.arange(offset, offset + num_elements, device=pool.device)
    pages = page_table.long()[v // page_size]
    return pool[pages, layer, v % page_size]


def lora_shrink(x: torch.Tensor, pool: torch.Tensor, layer: int, token_slots: torch.Tensor,
                page_tables: torch.Tensor, ranks: torch.Tensor, a_offsets: torch.Tensor,
                z: torch.Tensor, z_zeroed: bool = False) -> None:
    """z[t, p, :r] = x[t] A_p^T for each token's adapter and each of NPROJ projections (z_zeroed, the
    kernel's promise that z starts at zero, changes nothing here: z's rows are overwritten).

    x: [T, K]; pool: [P, L, PAGE]; token_slots: [T] int32 adapter slot per token, -1 = none;
    page_tables: [NS, MP] int32; ranks: [NS, NPROJ] int32 (0 = module not in the adapter);
    a_offsets: [NS, NPROJ] int64, virtual offset of A_p ([r, K], row-major) in the slot's space;
    z: [T, NPROJ, R_MAX] float32, written for every token with an adapter (zeros past r).
    """
    num_proj, k_dim = z.shape[1], x.shape[1]
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue
        tokens = (token_slots == slot).nonzero().flatten()
        xs = x.index_select(0, tokens).float()
        for p in range(num_proj):
            r = int(ranks[slot, p])
            z[tokens, p] = 0.0
            if r == 0:
                continue
            a = read_paged(pool, layer, page_tables[slot], int(a_offsets[slot, p]), r * k_dim).view(r, k_dim)
            z[tokens, p, :r] = xs @ a.float().t()


def lora_expand(z: torch.Tensor, pool: torch.Tensor, layer: int, token_slots: torch.Tensor,
                page_tables: torch.Tensor, ranks: torch.Tensor, b_offsets: torch.Tensor, scales: torch.Tensor,
                y: torch.Tensor, out_offsets: list[int], out_sizes: list[int], accumulate: bool = True,
                zero_after: torch.Tensor | None = None) -> None:
    """y[t, off_p : off_p + N_p] += scale_p * z[t, p, :r] B_p^T, in place (accumulate=False: y[...] =
    scale_p * z[t, p, :r] B_p^T rounded to y's dtype for every token, zeros for a projection of rank 0
    and for tokens without an adapter). zero_after: zero_after[t, p, :r] = 0 for the entries of z read.

    z: [T, NPROJ, R_MAX] float32 from lora_shrink; b_offsets: [NS, NPROJ] int64, virtual offset of
    B_p^T ([r, N_p], row-major: rank row j holds column j of PEFT's lora_B); scales: [NS, NPROJ]
    float32; y: [T, N_total]; out_offsets/out_sizes: where each projection's output sits in y.
    """
    for slot in token_slots.unique().tolist():
        tokens = (token_slots == slot).nonzero().flatten()
        for p, (off, n) in enumerate(zip(out_offsets, out_sizes)):
            r = 0 if slot < 0 else int(ranks[slot, p])
            if r == 0:
                if not accumulate:
                    y[tokens, off:off + n] = 0
                continue
            bt = read_paged(pool, layer, page_tables[slot], int(b_offsets[slot, p]), r * n).view(r, n)
            delta = ((z[tokens, p, :r] @ bt.float()) * float(scales[slot, p])).to(y.dtype)
            if zero_after is not None:
                zero_after[tokens, p, :r] = 0
            if accumulate:
                y[tokens, off:off + n] += delta
            else:
                y[tokens, off:off + n] = delta


def lora_fused(x: torch.Tensor, pool: torch.Tensor, layer: int, token_slots: torch.Tensor,
               page_tables: torch.Tensor, ranks: torch.Tensor, a_offsets: torch.Tensor, b_offsets: torch.Tensor,
               scales: torch.Tensor, y: torch.Tensor, out_offsets: list[int], out_sizes: list[int],
               max_rank: int) -> None:
    """y[t, off_p : off_p + N_p] += scale_p * (x[t] A_p^T) B_p^T, in place: lora_shrink into a float32
    z [T, NPROJ, max_rank], then lora_expand (the kernel keeps z on chip). Arguments as there."""
    z = torch.zeros(x.shape[0], len(out_sizes), max_rank, dtype=torch.float32, device=x.device)
    lora_shrink(x, pool, layer, token_slots, page_tables, ranks, a_offsets, z)
    lora_expand(z, pool, layer, token_slots, page_tables, ranks, b_offsets, scales, y, out_offsets, out_sizes)
