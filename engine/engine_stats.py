"""The engine's counters and gauges, as the Triton model's metrics read them (no torch: the stub
imports this)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_pages_total: int = 0  # the unified pool
    num_pages_free: int = 0
    num_kv_blocks_used: int = 0  # pages holding KV
    num_adapter_pages_used: int = 0  # pages holding adapters
    num_adapters_gpu: int = 0  # adapters resident in the pool
    num_adapters_host: int = 0  # adapters in the host tier
    adapter_loads_total: int = 0  # disk -> host
    adapter_load_seconds_total: float = 0.0
    adapter_hits_total: int = 0  # admitted with the adapter already in the pool
    adapter_misses_total: int = 0  # admitted after copying the adapter into the pool
    adapter_evictions_total: int = 0  # evicted from the pool
    adapter_prefetches_total: int = 0  # copied into the pool ahead of admission
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_preemptions_total: int = 0
    steps_total: int = 0
    num_non_finite_requests_total: int = 0  # failed for non-finite logits (their adapters quarantined)
    num_adapters_quarantined: int = 0
    # for gateways (vllm:lora_requests_info, vllm:lora_adapter_loaded): adapters of running and of
    # waiting requests, adapters the pool can hold for a batch, {name: digest} resident in the pool
    running_lora_adapters: list[str] = field(default_factory=list)
    waiting_lora_adapters: list[str] = field(default_factory=list)
    max_lora: int = 0
    gpu_adapters: dict[str, str] = field(default_factory=dict)
