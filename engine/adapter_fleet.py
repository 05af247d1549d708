"""The engine loop's view of the adapter fleet: freeing the pool pages of retired versions, the
rows of the admin model's ``list``, and the adapter state that gateways route on.

All of it runs on the engine loop's thread (it reads the page manager and the scheduler, which
that thread owns); the host tier (LoRAManager) is read under its own lock.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

FLEET_STATS_INTERVAL_S = 0.05  # gateway fields are recomputed at most this often


def evict_retired(engine: "LLMEngine") -> None:
    """Free the pool pages of versions no name serves any more, once no running request uses
    them. A version still held by a waiting request stays in the list until that one ends."""
    retired = engine.retired_adapters
    retired |= engine.lora.take_retired()
    if not retired:
        return
    pages, lora = engine.pages, engine.lora
    for key in list(retired):
        if lora.is_named(key):  # served again (the same bytes loaded under a name)
            retired.discard(key)
        elif pages.is_resident(key):
            if not pages.is_pinned(key):
                pages.evict_adapter(key)
                retired.discard(key)
        elif not lora.refs(key):
            retired.discard(key)


def adapter_rows(engine: "LLMEngine") -> list[dict[str, Any]]:
    """The admin model's ``list``: one row per served name."""
    rows = []
    for name, entry, packed, refs in engine.lora.entries():
        if packed is not None:
            tier = "gpu" if engine.pages.is_resident(packed.key) else "host"
            rank = max(packed.ranks.values(), default=0)
            modules = [m for m, r in packed.ranks.items() if r]
            num_bytes = packed.num_bytes
        else:
            path = entry.path if entry is not None else engine.lora.known.get(name)
            tier, rank, modules, num_bytes = "disk", None, None, _file_bytes(path)
        rows.append({"name": name, "digest": entry.digest if entry is not None else None, "rank": rank,
                     "target_modules": modules, "tier": tier, "bytes": num_bytes, "in_use": refs})
    return rows


def _file_bytes(path: str | None) -> int | None:
    """Size of adapter_model.safetensors on disk (what a disk-tier row reports)."""
    if not path:
        return None
    try:
        return os.path.getsize(os.path.join(path, "adapter_model.safetensors"))
    except OSError:
        return None


def fill_gateway_stats(engine: "LLMEngine", stats: Any) -> None:
    """The fields of EngineStats behind vllm:lora_requests_info and vllm:lora_adapter_loaded:
    adapters of running requests, adapters of waiting requests (two separate sets: a gateway
    tells "resident and serving" from "queued" by them), how many adapters the pool can hold for
    a batch, and the names and digests of the versions resident in the GPU pool."""
    now = time.monotonic()
    cached = engine.fleet_stats_cache
    if cached is None or now - cached[0] >= FLEET_STATS_INTERVAL_S:
        scheduler = engine.scheduler
        running = sorted({s.lora_name for s in scheduler.running if s.lora_name})
        waiting = sorted({s.lora_name for s in scheduler.waiting if s.lora_name})
        resident = engine.pages.resident_adapters()
        gpu = engine.lora.names_of(resident)
        cached = engine.fleet_stats_cache = (now, running, waiting, gpu, max_lora(engine))
    _, stats.running_lora_adapters, stats.waiting_lora_adapters, stats.gpu_adapters, stats.max_lora = cached


def max_lora(engine: "LLMEngine") -> int:
    """Adapters the pool can hold for one batch: with half the pool left to KV cache, how many
    of the largest adapter in host memory fit (with none loaded: one of max_lora_rank on every
    projection), at most max_num_seqs."""
    largest = engine.lora.largest_num_pages()
    if not largest:
        shapes = engine.model_config.projection_shapes()
        elements = engine.config.max_lora_rank * sum(n_in + n_out for n_in, n_out in shapes.values())
        largest = max(1, -(-elements // engine.runner.page_size))
    return max(1, min(engine.config.max_num_seqs, (engine.pages.num_pages // 2) // largest))
