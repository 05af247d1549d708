"""Slicing the full model and full adapters into one rank's shard (see parallel.ShardLayout).

Weights: the checkpoint is read whole (checkpoint.load_weights, on the host) and each rank keeps
its rows of q, k, v, gate, up, embed and lm_head and its columns of o and down; biases of the
row-parallel layers live on rank 0 only (they are added once, before the all-reduce).

Adapters, packed per rank into pages of the rank's own pool (``shard_adapter``):
- default (vLLM's): column layers keep A whole and take their rows of B (k and v: their KV
  heads'); row layers take their columns of A and keep B whole. The row layers' LoRA term is
  then a partial sum, added to the base output before its all-reduce: no extra collective.
- ``fully_sharded_loras`` (S-LoRA's): column layers take every N-th row of A (rank j rows j,
  j+N, ..., zero-padded to a multiple of N) and their rows of B; the shrink outputs are
  all-gathered once per projection group. Row layers take their columns of A (the shrink is
  all-reduced) and their slice of B's output rows.
"""
from __future__ import annotations

import torch

from engine.adapters import LORA_MODULES, PackedAdapter
from engine.checkpoint import load_weights, random_weights
from engine.config import ModelConfig
from engine.parallel import ShardLayout

COLUMN_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_MODULES = ("o_proj", "down_proj")


def _out_rows(module: str, config: ModelConfig, s: ShardLayout) -> slice:
    """This rank's output rows of a column-parallel module."""
    d = config.head_dim
    if module == "q_proj":
        return slice(s.rank * s.num_heads * d, (s.rank + 1) * s.num_heads * d)
    if module in ("k_proj", "v_proj"):
        return slice(s.kv_head_start * d, (s.kv_head_start + s.num_kv_heads) * d)
    return slice(s.rank * s.intermediate_size, (s.rank + 1) * s.intermediate_size)


def _in_cols(module: str, config: ModelConfig, s: ShardLayout) -> slice:
    """This rank's input columns of a row-parallel module."""
    width = s.num_heads * config.head_dim if module == "o_proj" else s.intermediate_size
    return slice(s.rank * width, (s.rank + 1) * width)


def shard_weights(config: ModelConfig, s: ShardLayout, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One rank's weights from the full ones (engine layout, see checkpoint.load_weights)."""
    q, kv, i = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size
    qr, kr, ur = _out_rows("q_proj", config, s), _out_rows("k_proj", config, s), _out_rows("up_proj", config, s)

    def rows(t: torch.Tensor, *parts: tuple[int, slice]) -> torch.Tensor:
        return torch.cat([t[base + r.start:base + r.stop] for base, r in parts]).contiguous()

    def vocab(t: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(s.vocab_size * s.size, t.shape[1], dtype=t.dtype)
        padded[:t.shape[0]] = t
        return padded[s.vocab_start:s.vocab_start + s.vocab_size].clone()

    out = {"embed": vocab(full["embed"]), "norm": full["norm"].clone()}
    out["lm_head"] = out["embed"] if full["lm_head"] is full["embed"] else vocab(full["lm_head"])
    for layer in range(config.num_layers):
        for name in ("input_norm", "post_norm"):
            out[f"{layer}.{name}"] = full[f"{layer}.{name}"].clone()
        qkv_parts = ((0, qr), (q, kr), (q + kv, kr))
        out[f"{layer}.qkv"] = rows(full[f"{layer}.qkv"], *qkv_parts)
        if f"{layer}.qkv_bias" in full:
            out[f"{layer}.qkv_bias"] = rows(full[f"{layer}.qkv_bias"], *qkv_parts)
        out[f"{layer}.gate_up"] = rows(full[f"{layer}.gate_up"], (0, ur), (i, ur))
        if f"{layer}.gate_up_bias" in full:
            out[f"{layer}.gate_up_bias"] = rows(full[f"{layer}.gate_up_bias"], (0, ur), (i, ur))
        for name, module in (("o", "o_proj"), ("down", "down_proj")):
            out[f"{layer}.{name}"] = full[f"{layer}.{name}"][:, _in_cols(module, config, s)].contiguous()
            if f"{layer}.{name}_bias" in full and s.rank == 0:
                out[f"{layer}.{name}_bias"] = full[f"{layer}.{name}_bias"].clone()
    return out


def load_shard(path: str, config: ModelConfig, s: ShardLayout, dtype: torch.dtype, device: torch.device,
               dummy: bool, seed: int) -> dict[str, torch.Tensor]:
    """This rank's weights on ``device``: read from the checkpoint at ``path`` (whole, on the host,
    then sliced), or random of the shard's shape (load_format dummy)."""
    if dummy:
        return random_weights(s.local_config(config), dtype, device, seed + s.rank)
    shard = shard_weights(config, s, load_weights(path, config, dtype, torch.device("cpu")))
    moved = {k: v.to(device) for k, v in shard.items() if k != "lm_head"}
    moved["lm_head"] = moved["embed"] if shard["lm_head"] is shard["embed"] else shard["lm_head"].to(device)
    return moved


def shard_adapter(full: PackedAdapter, config: ModelConfig, size: int, fully_sharded: bool, page_size: int,
                  pin_memory: bool = False) -> PackedAdapter:
    """Every rank's shard of a packed (checked) adapter, in pages of ``page_size``.

    Returns a PackedAdapter whose ``data`` is [N, L, num_pages * page_size] (rank j's pages at
    [j]); its offsets hold on every rank. ``ranks`` are what the expand reads: in
    ``fully_sharded`` mode a column module's rank is padded to a multiple of N, and each rank's
    shrink reads ranks // N rows of A.
    """
    layouts = [ShardLayout.of(config, j, size, fully_sharded) for j in range(size)]
    local = layouts[0].local_config(config)
    shapes, local_shapes = config.projection_shapes(), local.projection_shapes()
    num_layers = config.num_layers
    pieces: dict[str, tuple[int, int, int]] = {}  # module -> (rank read by expand, A rows per rank, B^T width)
    for m in LORA_MODULES:
        r = full.ranks.get(m, 0)
        if not r:
            continue
        n_in, n_out = local_shapes[m]
        if m in COLUMN_MODULES:
            a_rows = -(-r // size) if fully_sharded else r
            pieces[m] = (a_rows * size if fully_sharded else r, a_rows, n_out)
        else:
            pieces[m] = (r, r, config.hidden_size // size if fully_sharded else n_out)
    ranks, a_offsets, b_offsets, offset = {}, {}, {}, 0
    for m in LORA_MODULES:
        if m not in pieces:
            ranks[m] = 0
            continue
        rank, a_rows, width = pieces[m]
        ranks[m] = rank
        a_offsets[m] = offset
        offset += a_rows * local_shapes[m][0]
        b_offsets[m] = offset
        offset += rank * width
    num_pages = max(1, -(-offset // page_size))
    data = torch.zeros(size, num_layers, num_pages * page_size, dtype=full.data.dtype, pin_memory=pin_memory)
    for m, (rank, a_rows, width) in pieces.items():
        r = full.ranks[m]
        n_in, n_out = shapes[m]
        a = full.data[:, full.a_offsets[m]:full.a_offsets[m] + r * n_in].view(num_layers, r, n_in)
        b_t = full.data[:, full.b_offsets[m]:full.b_offsets[m] + r * n_out].view(num_layers, r, n_out)
        for j, s in enumerate(layouts):
            a_dest = data[j, :, a_offsets[m]:a_offsets[m] + a_rows * local_shapes[m][0]]
            a_dest = a_dest.view(num_layers, a_rows, local_shapes[m][0])
            b_dest = data[j, :, b_offsets[m]:b_offsets[m] + rank * width].view(num_layers, rank, width)
            if m in COLUMN_MODULES:
                cols = _out_rows(m, config, s)
                if fully_sharded:
                    mine = a[:, j::size]  # rows j, j+N, ...
                    a_dest[:, :mine.shape[1]] = mine
                else:
                    a_dest.copy_(a)
                b_dest[:, :r] = b_t[:, :, cols]
            else:
                a_dest.copy_(a[:, :, _in_cols(m, config, s)])
                if fully_sharded:
                    b_dest.copy_(b_t[:, :, j * width:(j + 1) * width])
                else:
                    b_dest.copy_(b_t)
    return PackedAdapter(full.name, data, num_pages, ranks, a_offsets, b_offsets, dict(full.scales),
                         digest=full.digest)

