"""Per-step LoRA kernel metadata: the step's tokens grouped into tiles that share an adapter.

One structure serves decode (BGMV: tokens of many adapters, a tile of one or two tokens per
adapter) and prefill (SGMV: long runs of one adapter cut into tiles of BLOCK_M tokens). It is
built on the tokens' device with torch ops and no host synchronisation, once per step, and
passed to every layer's lora_shrink / lora_expand call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import tiles


@dataclass(frozen=True)
class LoRAStepMeta:
    num_tokens: int  # T
    num_slots: int  # NS, rows of page_tables
    block_m: int  # tokens per tile (BLOCK_M)
    max_tiles: int  # grid size; tiles past the real count have length 0
    sorted_token_ids: torch.Tensor  # [T] int32, token indices ordered by slot, tokens without adapter last
    tile_starts: torch.Tensor  # [max_tiles] int32, first position of the tile in sorted_token_ids
    tile_lens: torch.Tensor  # [max_tiles] int32, tokens in the tile (0: unused tile)
    tile_slots: torch.Tensor  # [max_tiles] int32, the tile's adapter slot (-1: no adapter)
    num_lora_tiles: torch.Tensor  # [1] int32, tiles with an adapter: they come first (lora_fused visits only these)

    @classmethod
    def build(cls, token_slots: torch.Tensor, num_slots: int, block_m: int | None = None) -> "LoRAStepMeta":
        """token_slots: [T] int32 adapter slot per token (-1 = none), each < num_slots."""
        if token_slots.dim() != 1 or token_slots.dtype != torch.int32:
            raise ValueError(f"token_slots must be a 1-D int32 tensor, got {token_slots.dtype} "
                             f"of shape {tuple(token_slots.shape)}")
        num_tokens = token_slots.numel()
        device = token_slots.device
        if block_m is None:
            block_m = tiles.lora_block_m(num_tokens, on_gpu=device.type == "cuda")
        # a run of n tokens of one slot takes ceil(n / BLOCK_M) <= n / BLOCK_M + 1 tiles
        max_tiles = tiles.cdiv(num_tokens, block_m) + min(num_tokens, num_slots + 1)
        if num_tokens == 0:
            empty = torch.zeros(0, dtype=torch.int32, device=device)
            return cls(0, num_slots, block_m, 0, empty, empty, empty, empty,
                       torch.zeros(1, dtype=torch.int32, device=device))

        key = torch.where(token_slots < 0, num_slots, token_slots.long())  # [T]; no adapter sorts last
        sorted_key, order = torch.sort(key, stable=True)
        position = torch.arange(num_tokens, device=device)  # [T]
        is_run_start = torch.ones(num_tokens, dtype=torch.bool, device=device)
        is_run_start[1:] = sorted_key[1:] != sorted_key[:-1]
        run_start = torch.cummax(torch.where(is_run_start, position, 0), 0).values  # [T]
        is_tile_start = (position - run_start) % block_m == 0
        tile_id = torch.cumsum(is_tile_start, 0) - 1  # [T]
        # scatter the tile starts; non-start tokens write into one spare entry past the end
        tile_starts = torch.zeros(max_tiles + 1, dtype=torch.int64, device=device)
        tile_starts.scatter_(0, torch.where(is_tile_start, tile_id, max_tiles), position)
        tile_lens = torch.zeros(max_tiles, dtype=torch.int32, device=device)
        tile_lens.scatter_add_(0, tile_id, torch.ones(num_tokens, dtype=torch.int32, device=device))
        tile_slots = torch.full((max_tiles,), -1, dtype=torch.int64, device=device)
        tile_slots.scatter_(0, tile_id, torch.where(sorted_key == num_slots, -1, sorted_key))
        num_lora_tiles = (tile_slots >= 0).sum(dtype=torch.int32).reshape(1)
        return cls(num_tokens, num_slots, block_m, max_tiles, order.to(torch.int32),
                   tile_starts[:max_tiles].to(torch.int32), tile_lens, tile_slots.to(torch.int32), num_lora_tiles)

    def check(self, token_slots: torch.Tensor, num_slots: int) -> None:
        if self.num_tokens != token_slots.numel() or self.num_slots != num_slots:
            raise ValueError(f"LoRAStepMeta was built for {self.num_tokens} tokens and {self.num_slots} slots, "
                             f"called with {token_slots.numel()} tokens and {num_slots} slots: build it per step")
        if self.sorted_token_ids.device != token_slots.device:
            raise ValueError(f"LoRAStepMeta is on {self.sorted_token_ids.device}, tokens on {token_slots.device}")
