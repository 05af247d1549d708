"""The unified page pool's bookkeeping: KV blocks of sequences and pages of adapters share one
free list. Plain Python, no torch, so its invariants are testable alone.

A page holds either one KV block (``block_size`` tokens, all layers) of a sequence, or a piece
of one adapter's packed weights. Adapters resident in the pool are kept in LRU order; an adapter
that a running sequence uses is pinned and never evicted.
"""
from __future__ import annotations

from collections import OrderedDict


class PageManager:
    def __init__(self, num_pages: int, block_size: int) -> None:
        if num_pages < 1 or block_size < 1:
            raise ValueError("num_pages and block_size must be >= 1")
        self.num_pages = num_pages
        self.block_size = block_size
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() gives low ids first
        self._seq_tables: dict[str, list[int]] = {}
        self._adapters: OrderedDict[str, list[int]] = OrderedDict()  # LRU: least recent first
        self._pins: dict[str, int] = {}
        self.num_adapter_evictions = 0
        self._num_kv_pages = 0  # kept as pages move: the engine reads the counts every step
        self._num_adapter_pages = 0

    # --- counts ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def num_kv_pages(self) -> int:
        return self._num_kv_pages

    @property
    def num_adapter_pages(self) -> int:
        return self._num_adapter_pages

    @property
    def num_resident_adapters(self) -> int:
        return len(self._adapters)

    def free_pages(self) -> list[int]:
        """The pages no sequence or adapter owns (what they hold is stale: tests poison it)."""
        return sorted(self._free)

    def num_evictable_pages(self) -> int:
        return sum(len(p) for name, p in self._adapters.items() if not self._pins.get(name))

    # --- KV blocks of sequences -----------------------------------------------------------------
    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: str) -> list[int]:
        return self._seq_tables.get(seq_id, [])

    def extra_blocks(self, seq_id: str, num_tokens: int) -> int:
        """Pages the sequence still needs to hold ``num_tokens`` tokens in all."""
        return max(0, self.blocks_needed(num_tokens) - len(self._seq_tables.get(seq_id, [])))

    def grow(self, seq_id: str, num_tokens: int) -> list[int]:
        """Extend the sequence's block table to ``num_tokens`` tokens, evicting idle adapters if needed."""
        extra = self.extra_blocks(seq_id, num_tokens)
        if not self.reserve(extra):
            raise MemoryError(f"need {extra} pages, {self.num_free} free")
        table = self._seq_tables.setdefault(seq_id, [])
        table.extend(self._free.pop() for _ in range(extra))
        self._num_kv_pages += extra
        return table

    def free_seq(self, seq_id: str) -> None:
        """Return the sequence's KV blocks (a no-op for a sequence that holds none)."""
        table = self._seq_tables.pop(seq_id, None)
        if table:
            self._free.extend(reversed(table))
            self._num_kv_pages -= len(table)

    # --- adapters -------------------------------------------------------------------------------
    def is_resident(self, name: str) -> bool:
        return name in self._adapters

    def adapter_pages(self, name: str) -> list[int]:
        return self._adapters[name]

    def resident_adapters(self) -> list[str]:
        return list(self._adapters)

    def can_reserve(self, num_pages: int) -> bool:
        # the free list first: a decode step asks this of every sequence, mostly for 0 or 1 page
        return num_pages <= self.num_free or num_pages <= self.num_free + self.num_evictable_pages()

    def reserve(self, num_pages: int) -> bool:
        """Make ``num_pages`` pages free, evicting idle adapters (least recently used first)."""
        if num_pages <= self.num_free:
            return True
        if not self.can_reserve(num_pages):
            return False
        for name in list(self._adapters):
            if self.num_free >= num_pages:
                break
            if not self._pins.get(name):
                self.evict_adapter(name)
        return True

    def add_adapter(self, name: str, num_pages: int) -> list[int] | None:
        """Give a non-resident adapter its pages (evicting idle ones); None if they cannot be found."""
        assert name not in self._adapters, f"adapter {name!r} is already resident"
        if not self.reserve(num_pages):
            return None
        pages = [self._free.pop() for _ in range(num_pages)]
        self._adapters[name] = pages
        self._num_adapter_pages += num_pages
        return pages

    def touch(self, name: str) -> None:
        self._adapters.move_to_end(name)

    def pin(self, name: str) -> None:
        """A running sequence uses the adapter: it may not be evicted until unpinned."""
        assert name in self._adapters, f"adapter {name!r} is not resident"
        self._pins[name] = self._pins.get(name, 0) + 1
        self._adapters.move_to_end(name)

    def is_pinned(self, name: str) -> bool:
        return bool(self._pins.get(name))

    def unpin(self, name: str) -> None:
        count = self._pins.get(name, 0)
        assert count > 0, f"adapter {name!r} unpinned more often than pinned"
        if count == 1:
            del self._pins[name]
        else:
            self._pins[name] = count - 1

    def evict_adapter(self, name: str) -> None:
        assert not self._pins.get(name), f"adapter {name!r} is in use and cannot be evicted"
        pages = self._adapters.pop(name)
        self._free.extend(reversed(pages))
        self._num_adapter_pages -= len(pages)
        self.num_adapter_evictions += 1

    def check_invariants(self) -> None:
        """Every page is free or owned by exactly one sequence or adapter; pins only on residents."""
        owned = [p for t in self._seq_tables.values() for p in t] + [p for t in self._adapters.values() for p in t]
        everything = owned + self._free
        assert len(everything) == len(set(everything)) == self.num_pages, "pages lost or double-owned"
        assert all(name in self._adapters for name in self._pins), "a pinned adapter is not resident"
        assert self._num_kv_pages == sum(len(t) for t in self._seq_tables.values()), "KV page count drifted"
        assert self._num_adapter_pages == sum(len(p) for p in self._adapters.values()), "adapter page count drifted"
