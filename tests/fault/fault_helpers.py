"""Helpers of the fault tier: the failure counter's reason deltas, the idle baseline, readiness."""
from __future__ import annotations

import time
import urllib.request

from e2e_helpers import MODEL, metric_value, read_metrics

REASONS = ("not_found", "invalid_arg", "unavailable", "cancelled", "internal")
IDLE_GAUGES = ("multilora_num_requests_running", "multilora_num_requests_waiting",
               "multilora_kv_blocks_used")


def failure_counts(metrics_url: str) -> dict[str, float]:
    metrics = read_metrics(metrics_url)
    return {reason: metric_value(metrics, "multilora_request_failure_total", model=MODEL, reason=reason)
            for reason in REASONS}


def endings(metrics_url: str) -> dict[str, float]:
    """The failure counter by reason, and the success counter as "success"."""
    metrics = read_metrics(metrics_url)
    counts = {reason: metric_value(metrics, "multilora_request_failure_total", model=MODEL, reason=reason)
              for reason in REASONS}
    counts["success"] = metric_value(metrics, "multilora_request_success_total", model=MODEL)
    return counts


def failure_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {reason: after[reason] - before[reason] for reason in REASONS if after[reason] != before[reason]}


def idle_gauges(metrics_url: str) -> dict[str, float]:
    metrics = read_metrics(metrics_url)
    return {name: metric_value(metrics, name, model=MODEL) for name in IDLE_GAUGES}


def wait_for_idle(metrics_url: str, baseline: dict[str, float], timeout: float = 10.0) -> None:
    """Running and waiting requests and KV pages back to ``baseline`` (gauges refresh every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = idle_gauges(metrics_url)
        if gauges == baseline:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not back to its idle baseline: {gauges} != {baseline}")
        time.sleep(0.05)


def is_ready(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{http_url}/v2/models/{MODEL}/ready", timeout=10) as reply:
            return reply.status == 200
    except OSError:
        return False


def settled_baseline(metrics_url: str, timeout: float = 10.0) -> dict[str, float]:
    """The idle gauges once no request runs or waits and they read the same over three stats
    refreshes (0.1 s each)."""
    deadline = time.monotonic() + timeout
    readings: list[dict[str, float]] = []
    while True:
        gauges = idle_gauges(metrics_url)
        idle = gauges["multilora_num_requests_running"] == 0 == gauges["multilora_num_requests_waiting"]
        readings = readings + [gauges] if idle and (not readings or readings[-1] == gauges) else ([gauges] if idle else [])
        if len(readings) >= 3:
            return gauges
        if time.monotonic() > deadline:
            raise AssertionError(f"engine did not settle idle: {gauges}")
        time.sleep(0.12)
