"""The LoRA terms of a step with ``fully_sharded_loras`` (S-LoRA's tensor-parallel scheme).

Each rank holds a 1/N slice of every adapter (engine/sharding.py): column groups (qkv,
gate_up) shrink with their rows of A and all-gather the shrink output once per group; row
groups (o, down) shrink with their columns of A, all-reduce that (tokens x r) sum, and expand
with their slice of B into their slice of the output, before the base all-reduce. The default
mode needs none of this: the plain LoRABatch runs at the shard's shapes.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from engine.lora_batch import GroupMeta, LoRABatch
from engine.ops import Ops

if TYPE_CHECKING:
    from engine.parallel import TensorParallel

ROW_GROUPS = ("o", "down")


class FullyShardedLoRABatch(LoRABatch):
    """LoRABatch whose ``linear`` adds the collectives; ``split`` must be called once after build."""

    tp: "TensorParallel"
    shrink_groups: dict[str, GroupMeta]

    def split(self, tp: "TensorParallel") -> "FullyShardedLoRABatch":
        """Derive the shrink tables (column groups read ranks // N rows of A) and the row groups'
        output slice from the tables built for the expand."""
        self.tp = tp
        self.shrink_groups = {}
        width = tp.layout.hidden_size // tp.size
        for group, meta in list(self.groups.items()):
            if group in ROW_GROUPS:
                self.shrink_groups[group] = meta
                self.groups[group] = dataclasses.replace(meta, out_offsets=[tp.rank * width], out_sizes=[width])
            else:
                self.shrink_groups[group] = dataclasses.replace(meta, ranks=meta.ranks // tp.size,
                                                                max_rank=-(-meta.max_rank // tp.size))
        return self

    def linear(self, ops: Ops, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pool: torch.Tensor,
               layer: int, group: str, defer: bool = True) -> tuple[torch.Tensor, None]:
        """LoRABatch.linear with the collectives, on the main stream and never deferred."""
        y = ops.linear(x, weight, bias)
        meta = self.groups.get(group)
        if meta is None:
            return y, None
        shrink = self.shrink_groups[group]
        z = self._z.get(group)
        if z is None:  # [T, NPROJ, R_MAX / N] (column groups) or [T, NPROJ, R_MAX] float32
            z = self._z[group] = torch.zeros(x.shape[0], len(meta.out_sizes), shrink.max_rank,
                                             dtype=torch.float32, device=x.device)
        ops.lora_shrink(x, pool, layer, self, shrink, z)
        if group in ROW_GROUPS:
            self.tp.all_reduce(z)
            ops.lora_expand(z, pool, layer, self, meta, y)
        else:
            ops.lora_expand(self.tp.all_gather_ranks(z), pool, layer, self, meta, y)
        return y, None
