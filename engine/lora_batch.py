"""Per-step LoRA metadata: which tokens use which adapter, and applying the LoRA terms."""
from __future__ import annotations

import torch

from engine import ops
from engine.adapters import LoRAAdapter


class LoRABatch:
    """Tokens of one step grouped by adapter.

    token_slots: [T] adapter slot of each token (-1: base model). ``adapters[slot]`` holds the
    weights on the model's device. Built once per step; ``apply`` is called per projection.
    """

    def __init__(self, token_slots: list[int], adapters: dict[int, LoRAAdapter], device: torch.device) -> None:
        self.groups: list[tuple[torch.Tensor, LoRAAdapter]] = []
        by_slot: dict[int, list[int]] = {}
        for index, slot in enumerate(token_slots):
            if slot >= 0:
                by_slot.setdefault(slot, []).append(index)
        for slot, indices in sorted(by_slot.items()):
            self.groups.append((torch.tensor(indices, dtype=torch.int64, device=device), adapters[slot]))

    @property
    def is_empty(self) -> bool:
        return not self.groups

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, modules: tuple[str, ...],
              offsets: tuple[int, ...]) -> None:
        """y[:, offset_m : offset_m + out_m] += LoRA_m(x) for each module m, token by token's adapter.

        y: [T, N_total] output of the fused base projection; x: [T, K] its input.
        """
        if not self.groups:
            return
        for module, offset in zip(modules, offsets):
            groups = [(indices, *adapter.weights[layer][module])
                      for indices, adapter in self.groups if module in adapter.weights[layer]]
            if groups:
                ops.lora_shrink_expand(y, x, groups, offset)
