"""The adapter metrics that gateways route on (the Gateway API inference extension's model-server
protocol, llm-d router), in vLLM's names, through pb_utils.MetricFamily.

- ``vllm:lora_requests_info``: a gauge whose value is the time (Unix seconds) of its last change,
  labelled ``max_lora`` (adapters the pool can hold for a batch), ``running_lora_adapters``
  (adapters of running requests: resident and serving) and ``waiting_lora_adapters`` (adapters of
  queued requests), each a comma-separated list of names. The two lists come from two different
  sets (vLLM fills both from one, which makes a gateway's "queued" tier unreachable). One series
  at a time: when the state changes the old series is removed and a new one is set.
- ``vllm:lora_adapter_loaded{adapter_name, level="gpu", digest}``: 1 for each name whose version is
  resident in the GPU pool, removed when it leaves the pool.

Labelled {model, version} as the other metrics. Called from the response thread with each
engine stats message; writes only when something changed (each write is an IPC round trip).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import triton_python_backend_utils as pb_utils

INFO = "vllm:lora_requests_info"
LOADED = "vllm:lora_adapter_loaded"


class GatewayMetrics:
    def __init__(self, labels: dict[str, str], log: Callable[[str, str], None]) -> None:
        self._labels = dict(labels)
        self._log = log
        self._families: dict[str, Any] = {}
        self._info: Any = None
        self._info_state: tuple | None = None
        self._loaded: dict[tuple[str, str], Any] = {}
        self._failed = False
        try:
            kind = pb_utils.MetricFamily.GAUGE
            self._families[INFO] = pb_utils.MetricFamily(
                name=INFO, description="Running stats on LoRA requests (value: time of the last change).", kind=kind)
            self._families[LOADED] = pb_utils.MetricFamily(
                name=LOADED, description="LoRA adapters resident in the GPU pool (1 while resident).", kind=kind)
        except Exception as error:  # e.g. tritonserver --allow-metrics=false
            log("warn", f"gateway metrics disabled: {error}")
            self._families.clear()

    def update(self, stats: Any) -> None:
        if not self._families or self._failed:
            return
        try:
            self._update(stats)
        except Exception as error:  # a metric write never fails requests; said once
            self._failed = True
            self._log("warn", f"gateway metrics stopped: {error}")

    def _update(self, stats: Any) -> None:
        running = tuple(getattr(stats, "running_lora_adapters", ()) or ())
        waiting = tuple(getattr(stats, "waiting_lora_adapters", ()) or ())
        state = (int(getattr(stats, "max_lora", 0) or 0), running, waiting)
        if state != self._info_state:
            self._info = None  # the old series goes before the new one is set
            metric = self._families[INFO].Metric(labels=dict(
                self._labels, max_lora=str(state[0]), running_lora_adapters=",".join(running),
                waiting_lora_adapters=",".join(waiting)))
            metric.set(time.time())
            self._info, self._info_state = metric, state
        resident = set((getattr(stats, "gpu_adapters", None) or {}).items())
        for key in set(self._loaded) - resident:
            del self._loaded[key]
        for name, digest in sorted(resident - set(self._loaded)):
            metric = self._families[LOADED].Metric(labels=dict(self._labels, adapter_name=name, level="gpu",
                                                                digest=digest))
            metric.set(1)
            self._loaded[(name, digest)] = metric

    def close(self) -> None:
        """Drop metrics before their families (the order pb_utils requires)."""
        self._info = None
        self._loaded.clear()
        self._families.clear()
