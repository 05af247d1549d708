"""The host tier of adapters: which exist (multi_lora.json, adapter roots), which are loaded into
host memory (packed for the pool, pinned on CUDA), LRU within ``max_host_adapter_bytes``."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from engine.adapters import PackedAdapter, read_adapter
from engine.config import ModelConfig
from engine.errors import AdapterNotFoundError
from engine.request_checks import check_adapter_name

logger = logging.getLogger("multilora")


@dataclass
class AdapterStats:
    num_host: int = 0
    host_bytes: int = 0
    loads_total: int = 0  # disk -> host
    load_seconds_total: float = 0.0
    host_hits_total: int = 0
    host_evictions_total: int = 0


class LoRAManager:
    """Loads adapters from disk on first use and keeps them packed in host memory.

    ``acquire`` runs in request threads (it may read from disk) and returns the packed adapter
    with a reference held for the request; ``release`` drops it. An adapter a live request holds
    is never dropped from host memory.
    """

    def __init__(self, model: ModelConfig, known: dict[str, str], roots: list[str], max_lora_rank: int,
                 max_host_bytes: int, page_size: int, dtype: torch.dtype, pin_memory: bool,
                 allow_symlinks_outside_roots: bool = False,
                 shard: Callable[[PackedAdapter], PackedAdapter] | None = None) -> None:
        """``shard``: turns a packed adapter into what the pool holds (tensor parallelism: every
        rank's slice of it, engine/sharding.py); by default the packed adapter itself."""
        for name in known:
            check_adapter_name(name)
        self.model = model
        self.known = dict(known)
        self.roots = list(roots)
        self.max_lora_rank = max_lora_rank
        self.max_host_bytes = max_host_bytes
        self.page_size = page_size
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.allow_symlinks_outside_roots = allow_symlinks_outside_roots
        self._shard = shard or (lambda packed: packed)
        self._lock = threading.Lock()
        self._host: OrderedDict[str, PackedAdapter] = OrderedDict()  # LRU: least recent first
        self._refs: dict[str, int] = {}
        self._host_bytes = 0  # of the adapters in self._host, kept as they come and go
        self.stats = AdapterStats()

    def resolve(self, name: str) -> str:
        """Path of a known adapter, or AdapterNotFoundError (which names no other adapter and no path:
        a client learns nothing of what else is served)."""
        return self._locate(name)[0]

    def _locate(self, name: str) -> tuple[str, str | None]:
        """(path, the adapter root it was found in, or None for a multi_lora.json adapter)."""
        check_adapter_name(name)
        if name in self.known:
            return self.known[name], None
        for root in self.roots:
            candidate = os.path.join(root, name)
            if os.path.isfile(os.path.join(candidate, "adapter_config.json")):
                return candidate, root
        logger.info("LoRA adapter '%s' is not known (adapter roots searched: %s)", name, self.roots)
        raise AdapterNotFoundError(f"LoRA adapter '{name}' is not known")

    def acquire(self, name: str) -> PackedAdapter:
        with self._lock:
            packed = self._host.get(name)
            if packed is not None:
                self._host.move_to_end(name)
                self._refs[name] = self._refs.get(name, 0) + 1
                self.stats.host_hits_total += 1
                return packed
        path, root = self._locate(name)
        start = time.monotonic()
        # An adapter found in a root stays inside it: a directory or file symlinked out of it would
        # let whoever writes the root read any file the server can (names symlinked to adapters of
        # the same root, as bench/serving.py makes them, are inside). multi_lora.json paths are
        # the operator's own.
        packed = read_adapter(name, path, self.model, self.max_lora_rank, self.page_size, self.dtype, self.pin_memory,
                              root=None if root is None or self.allow_symlinks_outside_roots else root)
        packed = self._shard(packed)
        seconds = time.monotonic() - start
        with self._lock:
            if name in self._host:  # another thread loaded it meanwhile
                packed = self._host[name]
                self._host.move_to_end(name)
            else:
                self._put(name, packed)
                self.stats.loads_total += 1
                self.stats.load_seconds_total += seconds
                logger.info("loaded LoRA adapter '%s' (%d pages) from disk in %.3f s",
                            name, packed.num_pages, seconds)
            self._refs[name] = self._refs.get(name, 0) + 1
            self._shrink()
        return packed

    def register(self, name: str, packed: PackedAdapter) -> None:
        """Add an adapter made in memory (benchmarks, tests) to the host tier, as if loaded from disk."""
        check_adapter_name(name)
        packed = self._shard(packed)
        with self._lock:
            self.known[name] = f"<memory:{name}>"
            self._put(name, packed)
            self._shrink()

    def release(self, name: str) -> None:
        with self._lock:
            count = self._refs.get(name, 0)
            assert count > 0, f"adapter {name!r} released more often than acquired"
            if count == 1:
                del self._refs[name]
            else:
                self._refs[name] = count - 1
            self._shrink()

    def is_in_host(self, name: str) -> bool:
        """Whether ``acquire`` would return without reading from disk."""
        with self._lock:
            return name in self._host

    def get(self, name: str) -> PackedAdapter:
        with self._lock:
            return self._host[name]

    def snapshot(self) -> AdapterStats:
        with self._lock:
            self.stats.num_host = len(self._host)
            self.stats.host_bytes = self._host_bytes
            return AdapterStats(**vars(self.stats))

    def _put(self, name: str, packed: PackedAdapter) -> None:
        # caller holds the lock
        old = self._host.pop(name, None)
        self._host_bytes += packed.num_bytes - (old.num_bytes if old is not None else 0)
        self._host[name] = packed

    def _shrink(self) -> None:
        # caller holds the lock: drop unreferenced adapters, least recent first, until within budget
        for name in list(self._host):
            if self._host_bytes <= self.max_host_bytes:
                return
            if not self._refs.get(name):
                self._host_bytes -= self._host.pop(name).num_bytes
                self.stats.host_evictions_total += 1
