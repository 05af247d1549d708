"""Prometheus metrics of the multilora model, through pb_utils.MetricFamily.

Every metric is labelled {model, version}; the failure counter also carries ``reason``
(invalid_arg, not_found, unavailable, cancelled, internal: the Triton error code sent) and
``multilora_adapters_resident`` a ``tier`` (gpu, host). Metrics that mean what a vLLM metric
means are also exported under the vLLM name, for gateways that route on them.

Request metrics come from the responses the model sends; gauges and the engine's own counters
come from ``engine.stats()`` (read every STATS_POLL_S by the response thread; fields the engine
does not have are skipped).

All methods are called from the model's response thread only. Each pb_utils metric call is an
IPC round trip to the server (about 18 us measured on the 2-core dev machine), so counters are
accumulated here and written by ``flush()``, and gauges are written only when they change.
The MetricFamily objects are kept in ``self._families``: a family that is garbage-collected makes
its metrics fail ("the corresponding 'MetricFamily' has been deleted").
"""
from __future__ import annotations

from typing import Any, Callable

import triton_python_backend_utils as pb_utils

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0]
INTER_TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                       0.4, 0.5, 0.75, 1.0, 2.5]

COUNTERS = {
    "multilora_request_success_total": "Requests that finished (stop or length).",
    "multilora_request_failure_total": "Requests that ended with an error, by reason.",
    "multilora_prompt_tokens_total": "Prompt tokens of the requests served.",
    "multilora_generation_tokens_total": "Tokens generated.",
    "multilora_adapter_loads_total": "Adapter loads from disk into host memory.",
    "multilora_adapter_load_seconds_total": "Time spent loading adapters from disk.",
    "multilora_adapter_cache_hits_total": "Requests admitted with their adapter already in the GPU pool.",
    "multilora_adapter_cache_misses_total": "Requests admitted after copying their adapter into the pool.",
    "multilora_adapter_evictions_total": "Adapters evicted from the GPU pool.",
    "multilora_preemptions_total": "Running requests preempted (recomputed later).",
    "multilora_engine_steps_total": "Engine steps run (one batch of prefill and decode tokens each).",
    "multilora_non_finite_requests_total": "Requests failed for non-finite logits (NaN or Inf); the rest of "
                                           "their batch went on.",
    "vllm:prompt_tokens_total": "Number of prefill tokens processed.",
    "vllm:generation_tokens_total": "Number of generation tokens processed.",
    "vllm:num_preemptions_total": "Cumulative number of preemption from the engine.",
}
GAUGES = {
    "multilora_num_requests_running": "Requests in the running batch.",
    "multilora_num_requests_waiting": "Requests waiting to be scheduled.",
    "multilora_kv_cache_usage_perc": "Fraction of the pool's pages holding KV cache (1 = 100 percent).",
    "multilora_kv_blocks_used": "Pages (KV blocks) holding KV cache.",
    "multilora_kv_blocks_total": "Pages in the pool that KV cache and adapters share.",
    "multilora_pool_pages_free": "Free pages in the pool.",
    "multilora_adapter_pages_used": "Pages of the pool holding adapter weights.",
    "multilora_adapters_loaded": "Adapters resident in the GPU pool.",
    "multilora_adapters_resident": "Adapters resident per tier.",
    "multilora_adapters_quarantined": "Adapters refused since one of their requests made non-finite logits.",
    "vllm:num_requests_running": "Number of requests currently running on GPU.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:gpu_cache_usage_perc": "GPU KV-cache usage. 1 means 100 percent usage.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
}
# Histograms fall back to gauges (last value) on servers older than 24.08.
HISTOGRAMS = {
    "multilora_time_to_first_token_seconds": ("Time from request arrival to its first token.",
                                              TTFT_BUCKETS),
    "multilora_inter_token_latency_seconds": ("Mean time between the streamed tokens of a request, one "
                                              "observation per streaming request.",
                                              INTER_TOKEN_BUCKETS),
}

# gauge series <- the first engine.stats() field present
_STAT_GAUGES = [
    (("multilora_num_requests_running", "vllm:num_requests_running"), (), ("num_running",)),
    (("multilora_num_requests_waiting", "vllm:num_requests_waiting"), (), ("num_waiting",)),
    (("multilora_kv_blocks_used",), (), ("num_kv_blocks_used",)),
    (("multilora_kv_blocks_total",), (), ("num_kv_blocks_total", "num_pages_total")),
    (("multilora_pool_pages_free",), (), ("num_pages_free",)),
    (("multilora_adapter_pages_used",), (), ("num_adapter_pages_used",)),
    (("multilora_adapters_loaded",), (), ("num_adapters_loaded", "num_adapters_gpu")),
    (("multilora_adapters_resident",), (("tier", "gpu"),), ("num_adapters_gpu",)),
    (("multilora_adapters_resident",), (("tier", "host"),), ("num_adapters_host",)),
    (("multilora_adapters_quarantined",), (), ("num_adapters_quarantined",)),
]
# counters <- increments of a cumulative engine.stats() field
_STAT_COUNTERS = [
    (("multilora_adapter_loads_total",), "adapter_loads_total"),
    (("multilora_adapter_load_seconds_total",), "adapter_load_seconds_total"),
    (("multilora_adapter_cache_hits_total",), "adapter_hits_total"),
    (("multilora_adapter_cache_misses_total",), "adapter_misses_total"),
    (("multilora_adapter_evictions_total",), "adapter_evictions_total"),
    (("multilora_preemptions_total", "vllm:num_preemptions_total"), "num_preemptions_total"),
    (("multilora_engine_steps_total",), "steps_total"),
    (("multilora_non_finite_requests_total",), "num_non_finite_requests_total"),
]

Labels = tuple  # extra labels as ((key, value), ...)


class ServingMetrics:
    """The model's metrics; a no-op when the server runs with metrics off."""

    def __init__(self, labels: dict[str, str], log: Callable[[str, str], None]) -> None:
        self._log = log
        self._failed_names: set[str] = set()
        self._labels = dict(labels)
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple[str, Labels], Any] = {}
        self._pending: dict[tuple[str, Labels], float] = {}  # counter increments not yet written
        self._gauge_values: dict[tuple[str, Labels], float] = {}
        self._stat_totals: dict[str, float] = {}
        self._has_histograms = hasattr(pb_utils.MetricFamily, "HISTOGRAM")
        try:
            self._create_families()
        except Exception as error:  # e.g. tritonserver --allow-metrics=false
            log("warn", f"metrics disabled: {error}")
            self._metrics.clear()
            self._families.clear()
        if not self._has_histograms:
            log("warn", "this Triton has no histogram metrics (older than 24.08); latency "
                        "metrics are exported as gauges holding the last value")

    # -- request events (counters accumulate until flush) --------------------------------------
    def request_succeeded(self) -> None:
        self._add("multilora_request_success_total", 1)

    def request_failed(self, reason: str) -> None:
        self._add("multilora_request_failure_total", 1, (("reason", reason),))

    def prompt_tokens(self, count: int) -> None:
        self._add("multilora_prompt_tokens_total", count)
        self._add("vllm:prompt_tokens_total", count)

    def generation_tokens(self, count: int) -> None:
        self._add("multilora_generation_tokens_total", count)
        self._add("vllm:generation_tokens_total", count)

    def time_to_first_token(self, seconds: float) -> None:
        self._observe("multilora_time_to_first_token_seconds", seconds)

    def inter_token_latency(self, seconds: float) -> None:
        self._observe("multilora_inter_token_latency_seconds", seconds)

    # -- engine state -------------------------------------------------------------------------
    def engine_stats(self, stats: Any) -> None:
        """Gauges, and counters of the engine's cumulative totals, from an EngineStats."""
        if not self._families:
            return
        for names, labels, fields in _STAT_GAUGES:
            value = _first_field(stats, fields)
            if value is not None:
                for name in names:
                    self._set(name, float(value), labels)
        used = _first_field(stats, ("num_kv_blocks_used",))
        total = _first_field(stats, ("num_kv_blocks_total", "num_pages_total"))
        if used is not None and total is not None:
            usage = used / total if total else 0.0
            self._set("multilora_kv_cache_usage_perc", usage)
            self._set("vllm:gpu_cache_usage_perc", usage)
            self._set("vllm:kv_cache_usage_perc", usage)  # the newer name
        for names, field in _STAT_COUNTERS:
            value = _first_field(stats, (field,))
            if value is None:
                continue
            seen = self._stat_totals.get(field, 0)
            if value > seen:
                for name in names:
                    self._add(name, value - seen)
            self._stat_totals[field] = value

    def flush(self) -> None:
        """Write the accumulated counter increments."""
        pending, self._pending = self._pending, {}
        for (name, labels), value in pending.items():
            if value:
                self._guarded(name, lambda: self._metric(name, labels).increment(value))

    def close(self) -> None:
        """Drop metrics before their families (the order pb_utils requires)."""
        self._metrics.clear()
        self._families.clear()

    # -- internals ------------------------------------------------------------------------------
    def _create_families(self) -> None:
        kinds = pb_utils.MetricFamily
        for name, description in COUNTERS.items():
            self._families[name] = kinds(name=name, description=description, kind=kinds.COUNTER)
        for name, description in GAUGES.items():
            self._families[name] = kinds(name=name, description=description, kind=kinds.GAUGE)
        for name, (description, _) in HISTOGRAMS.items():
            kind = kinds.HISTOGRAM if self._has_histograms else kinds.GAUGE
            self._families[name] = kinds(name=name, description=description, kind=kind)
        # Series that exist before any request, so that they read 0 instead of being absent.
        for name in ["multilora_request_success_total", "multilora_prompt_tokens_total",
                     "multilora_generation_tokens_total", "vllm:prompt_tokens_total",
                     "vllm:generation_tokens_total", *HISTOGRAMS]:
            self._metric(name, ())

    def _metric(self, name: str, labels: Labels) -> Any:
        key = (name, labels)
        metric = self._metrics.get(key)
        if metric is None:
            all_labels = dict(self._labels, **dict(labels))
            if name in HISTOGRAMS and self._has_histograms:
                metric = self._families[name].Metric(labels=all_labels,
                                                     buckets=HISTOGRAMS[name][1])
            else:
                metric = self._families[name].Metric(labels=all_labels)
            self._metrics[key] = metric
        return metric

    def _add(self, name: str, value: float, labels: Labels = ()) -> None:
        if self._families:
            key = (name, labels)
            self._pending[key] = self._pending.get(key, 0) + value

    def _observe(self, name: str, value: float) -> None:
        if not self._families:
            return
        if self._has_histograms:
            self._guarded(name, lambda: self._metric(name, ()).observe(value))
        else:
            self._guarded(name, lambda: self._metric(name, ()).set(value))

    def _set(self, name: str, value: float, labels: Labels = ()) -> None:
        key = (name, labels)
        if self._gauge_values.get(key) != value:
            self._guarded(name, lambda: self._metric(name, labels).set(value))
            self._gauge_values[key] = value

    def _guarded(self, name: str, write: Callable[[], None]) -> None:
        """A failed metric write (e.g. while the server shuts down) never fails a request."""
        try:
            write()
        except Exception as error:
            if name not in self._failed_names:
                self._failed_names.add(name)
                self._log("warn", f"metric {name}: {error}")


def _first_field(stats: Any, fields: tuple[str, ...]) -> float | None:
    for field in fields:
        value = getattr(stats, field, None)
        if value is not None:
            return value
    return None
