"""The adapter metrics that gateways route on (the Gateway API inference extension's model-server
protocol, llm-d router), in vLLM's names, through pb_utils.MetricFamily.

- ``vllm:lora_requests_info``: a gauge whose value is the time (Unix seconds) of its last change,
  labelled ``max_lora`` (adapters the pool can hold for a batch), ``running_lora_adapters``
  (adapters of running requests: resident and serving) and ``waiting_lora_adapters`` (adapters of
  queued requests), each a comma-separated list of names. The two lists come from two different
  sets (vLLM fills both from one, which makes a gateway's "queued" tier unreachable). One series
  per state seen: the current one holds the time, earlier ones are set to 0 (a series stays on
  /metrics once made: Triton 2.51 keeps it after its pb_utils.Metric is dropped), and a state
  seen again takes its series back.
- ``vllm:lora_adapter_loaded{adapter_name, level="gpu", digest}``: 1 for each name whose version is
  resident in the GPU pool, 0 once it has left the pool.

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
        self._info_series: dict[tuple, Any] = {}  # every state seen -> its series
        self._loaded: dict[tuple[str, str], Any] = {}  # (name, digest) -> its series
        self._resident: set[tuple[str, str]] = set()
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
            if self._info is not None:
                self._info.set(0)
            metric = self._info_series.get(state)
            if metric is None:
                metric = self._families[INFO].Metric(labels=dict(
                    self._labels, max_lora=str(state[0]), running_lora_adapters=",".join(running),
                    waiting_lora_adapters=",".join(waiting)))
                self._info_series[state] = metric
            metric.set(time.time())
            self._info, self._info_state = metric, state
        resident = set((getattr(stats, "gpu_adapters", None) or {}).items())
        if resident != self._resident:
            for key in self._resident - resident:
                self._loaded[key].set(0)
            for name, digest in sorted(resident - self._resident):
                metric = self._loaded.get((name, digest))
                if metric is None:
                    metric = self._loaded[(name, digest)] = self._families[LOADED].Metric(
                        labels=dict(self._labels, adapter_name=name, level="gpu", digest=digest))
                metric.set(1)
            self._resident = resident

    def close(self) -> None:
        """Drop metrics before their families (the order pb_utils requires)."""
        self._info = None
        self._info_series.clear()
        self._loaded.clear()
        self._families.clear()
