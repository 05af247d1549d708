"""Which adapters exist (multi_lora.json, adapter roots), which are loaded, and who uses them."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.adapters import LoRAAdapter, load_adapter
from engine.config import ModelConfig
from engine.errors import AdapterNotFoundError, InvalidRequestError

logger = logging.getLogger("multilora")


def check_adapter_name(name: str) -> None:
    """A plain name: no path separators, no '..', no leading dot."""
    if (not name or "/" in name or "\\" in name or ".." in name or name.startswith(".")
            or any(ch.isspace() or ord(ch) < 32 for ch in name)):
        raise InvalidRequestError(
            f"lora_name {name!r} is not a plain adapter name (no path separators, '..', leading dots or spaces)")


@dataclass
class AdapterStats:
    num_loaded: int = 0
    loads_total: int = 0
    load_seconds_total: float = 0.0
    hits_total: int = 0
    misses_total: int = 0
    evictions_total: int = 0


class LoRAManager:
    """Loads adapters on first use, keeps up to ``max_loaded`` on the device, LRU among unused ones.

    ``acquire`` is called from request threads (it may read from disk); ``release`` and ``get``
    from the engine loop. An adapter that a live request holds is never evicted.
    """

    def __init__(self, model: ModelConfig, known: dict[str, str], roots: list[str], max_lora_rank: int,
                 max_loaded: int, device: torch.device, dtype: torch.dtype) -> None:
        for name in known:
            check_adapter_name(name)
        self.model = model
        self.known = dict(known)
        self.roots = list(roots)
        self.max_lora_rank = max_lora_rank
        self.max_loaded = max_loaded
        self.device, self.dtype = device, dtype
        self._lock = threading.Lock()
        self._by_name: OrderedDict[str, int] = OrderedDict()  # LRU order: oldest first
        self._slots: dict[int, LoRAAdapter] = {}
        self._refs: dict[int, int] = {}
        self._next_slot = 0
        self.stats = AdapterStats()

    def resolve(self, name: str) -> str:
        """Path of a known adapter, or AdapterNotFoundError listing what is known."""
        check_adapter_name(name)
        if name in self.known:
            return self.known[name]
        for root in self.roots:
            candidate = os.path.join(root, name)
            if os.path.isfile(os.path.join(candidate, "adapter_config.json")):
                return candidate
        names = sorted(self.known)
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise AdapterNotFoundError(
            f"LoRA adapter '{name}' is not known; known adapters: [{shown}]"
            + (f"; adapter roots searched: {self.roots}" if self.roots else ""))

    def acquire(self, name: str) -> int:
        """Slot of the adapter, loading it if needed; the caller must ``release`` it later."""
        with self._lock:
            slot = self._by_name.get(name)
            if slot is not None:
                self._by_name.move_to_end(name)
                self._refs[slot] += 1
                self.stats.hits_total += 1
                return slot
        path = self.resolve(name)
        start = time.monotonic()
        adapter = load_adapter(name, path, self.model, self.max_lora_rank).to(self.device, self.dtype)
        seconds = time.monotonic() - start
        with self._lock:
            slot = self._by_name.get(name)
            if slot is not None:  # another thread loaded it meanwhile
                self._refs[slot] += 1
                self.stats.hits_total += 1
                return slot
            self._evict_to(self.max_loaded - 1)
            slot = self._next_slot
            self._next_slot += 1
            self._by_name[name] = slot
            self._slots[slot] = adapter
            self._refs[slot] = 1
            self.stats.misses_total += 1
            self.stats.loads_total += 1
            self.stats.load_seconds_total += seconds
            self.stats.num_loaded = len(self._slots)
        logger.info("[multilora] loaded LoRA adapter '%s' (rank %d, %s) in %.3f s",
                    name, adapter.rank, ",".join(adapter.modules), seconds)
        return slot

    def release(self, slot: int) -> None:
        with self._lock:
            self._refs[slot] -= 1
            assert self._refs[slot] >= 0, "adapter released more often than acquired"

    def get(self, slot: int) -> LoRAAdapter:
        with self._lock:
            return self._slots[slot]

    def num_referenced(self) -> int:
        with self._lock:
            return sum(1 for r in self._refs.values() if r > 0)

    def _evict_to(self, target: int) -> None:
        # caller holds the lock
        for name in list(self._by_name):
            if len(self._slots) <= target:
                return
            slot = self._by_name[name]
            if self._refs[slot] == 0:
                del self._by_name[name], self._slots[slot], self._refs[slot]
                self.stats.evictions_total += 1
