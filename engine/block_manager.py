"""KV-cache blocks: which sequence owns which block. Plain Python, no torch, so it is testable alone."""
from __future__ import annotations


class BlockManager:
    """Hands out fixed-size KV blocks to sequences and takes them back.

    A sequence's block table lists its blocks in order; token ``i`` of the sequence lives in
    block ``table[i // block_size]`` at offset ``i % block_size``.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives low ids first
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def can_allocate(self, num_tokens: int, seq_id: str | None = None) -> bool:
        """Whether the sequence can grow to hold ``num_tokens`` tokens in all."""
        have = len(self._tables.get(seq_id, [])) if seq_id is not None else 0
        return self.blocks_needed(num_tokens) - have <= len(self._free)

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow the sequence's table to cover ``num_tokens`` tokens; returns the table."""
        table = self._tables.setdefault(seq_id, [])
        extra = self.blocks_needed(num_tokens) - len(table)
        if extra > len(self._free):
            raise MemoryError(f"need {extra} KV blocks, {len(self._free)} free")
        for _ in range(max(extra, 0)):
            table.append(self._free.pop())
        return table

    def free(self, seq_id: str) -> None:
        """Return all blocks of the sequence (a no-op for a sequence that holds none)."""
        table = self._tables.pop(seq_id, None)
        if table:
            self._free.extend(reversed(table))

    def check_invariants(self) -> None:
        """Every block is either free or owned by exactly one sequence."""
        owned = [b for t in self._tables.values() for b in t]
        seen = owned + self._free
        assert len(seen) == len(set(seen)) == self.num_blocks, "KV blocks lost or double-owned"
