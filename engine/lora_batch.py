"""Per-step LoRA metadata: which tokens use which adapter, where each adapter's pages are, and
applying the LoRA terms of a fused projection through the page tables."""
from __future__ import annotations

import torch

from engine.ops import Ops
from engine.adapters import PackedAdapter

# fused projections of the model and the LoRA modules whose outputs they hold, in order
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}


class LoRABatch:
    """Built once per step from the adapters of the scheduled tokens.

    token_slots: [T] int32, index into this step's adapters (-1: base model);
    page_tables: [NS, MP] int32; per group: ranks [NS, NPROJ] int32, a_offsets / b_offsets
    [NS, NPROJ] int64, scales [NS, NPROJ] float32.
    """

    def __init__(self, ops: Ops, token_adapters: list[str | None], adapters: dict[str, PackedAdapter],
                 adapter_pages: dict[str, list[int]], out_sizes: dict[str, int], device: torch.device) -> None:
        names = sorted(adapters)
        slot_of = {name: i for i, name in enumerate(names)}
        self.num_slots = len(names)
        if not names:
            return
        self.token_slots = torch.tensor([slot_of[n] if n else -1 for n in token_adapters], dtype=torch.int32,
                                        device=device)
        max_pages = max(len(adapter_pages[n]) for n in names)
        self.page_tables = torch.tensor([adapter_pages[n] + [0] * (max_pages - len(adapter_pages[n])) for n in names],
                                        dtype=torch.int32, device=device)
        self.kernel_meta = ops.lora_meta(self.token_slots, self.num_slots)  # tiles by adapter, once per step
        self.meta = {}
        self._z: dict[str, torch.Tensor] = {}  # per group, reused by every layer
        for group, modules in GROUPS.items():
            packed = [adapters[n] for n in names]
            ranks = torch.tensor([[p.ranks[m] for m in modules] for p in packed], dtype=torch.int32)
            if not bool(ranks.any()):
                continue
            a_off = torch.tensor([[p.a_offsets.get(m, 0) for m in modules] for p in packed], dtype=torch.int64)
            b_off = torch.tensor([[p.b_offsets.get(m, 0) for m in modules] for p in packed], dtype=torch.int64)
            scales = torch.tensor([[p.scales.get(m, 0.0) for m in modules] for p in packed], dtype=torch.float32)
            sizes = [out_sizes[m] for m in modules]
            offsets = [sum(sizes[:j]) for j in range(len(sizes))]
            self.meta[group] = (ranks.to(device), a_off.to(device), b_off.to(device), scales.to(device),
                                offsets, sizes, int(ranks.max()))

    def apply(self, ops: Ops, y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, layer: int, group: str) -> None:
        """y += LoRA(x) for the modules of ``group``; y: [T, N_total] fused output, x: [T, K]."""
        if self.num_slots == 0 or group not in self.meta:
            return
        ranks, a_off, b_off, scales, offsets, sizes, max_rank = self.meta[group]
        z = self._z.get(group)
        if z is None:  # [T, NPROJ, R_MAX] float32
            z = self._z[group] = torch.empty(x.shape[0], len(sizes), max_rank, dtype=torch.float32, device=x.device)
        ops.lora_shrink(x, pool, layer, self.token_slots, self.page_tables, ranks, a_off, z, self.kernel_meta)
        ops.lora_expand(z, pool, layer, self.token_slots, self.page_tables, ranks, b_off, scales, y, offsets, sizes,
                        self.kernel_meta)
