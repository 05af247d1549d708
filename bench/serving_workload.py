"""S-LoRA's synthetic serving workload, and the figures a serving run is summarised by.

The workload follows S-LoRA's generator (``benchmarks/trace.py: generate_requests``): ``int(rate *
duration)`` requests; adapter ``floor(n * x)`` with ``x ~ Power(alpha)`` (density ``alpha * x^(alpha-1)``
on [0, 1), so adapter k has probability ``((k+1)/n)^alpha - (k/n)^alpha``: alpha = 1 is uniform, a
smaller alpha concentrates the traffic on the first adapters); gaps between arrivals gamma-distributed
with mean ``1/rate`` and coefficient of variation ``cv`` (shape ``1/cv^2``; cv = 1 is Poisson); input
and output lengths uniform in [low, high). Prompts are random token ids, so no tokenizer work counts.

Pure Python + numpy: no torch, no Triton (unit-tested on the CPU machine).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

SLO_TTFT_S = 6.0  # S-LoRA's SLO: first token within 6 s


@dataclass(frozen=True)
class WorkloadRequest:
    index: int
    arrival_s: float  # from the start of the run
    adapter: str
    input_len: int
    output_len: int  # max_tokens, with ignore_eos
    prompt_ids: tuple[int, ...]


def power_law_probs(num_adapters: int, alpha: float) -> np.ndarray:
    """Probability of each adapter index under S-LoRA's floor(n * Power(alpha)) draw."""
    edges = (np.arange(num_adapters + 1) / num_adapters) ** alpha
    return np.diff(edges)


def generate_workload(num_adapters: int, alpha: float, rate: float, cv: float, duration_s: float,
                      adapter_names: Sequence[str], input_range: tuple[int, int] = (8, 512),
                      output_range: tuple[int, int] = (8, 512), vocab_size: int = 32000,
                      first_token_id: int = 3, seed: int = 0) -> list[WorkloadRequest]:
    """S-LoRA's synthetic trace; the same arguments give the same requests."""
    if num_adapters < 1 or len(adapter_names) < num_adapters:
        raise ValueError(f"need {num_adapters} adapter names, got {len(adapter_names)}")
    if alpha <= 0 or rate <= 0 or cv <= 0 or duration_s <= 0:
        raise ValueError("alpha, rate, cv and duration_s must be > 0")
    for low, high in (input_range, output_range):
        if not 1 <= low < high:
            raise ValueError(f"length range [{low}, {high}) is empty or starts below 1")
    rng = np.random.default_rng(seed)
    total = int(rate * duration_s)
    adapter_index = np.minimum((rng.power(alpha, total) * num_adapters).astype(np.int64), num_adapters - 1)
    input_lens = rng.integers(input_range[0], input_range[1], total)
    output_lens = rng.integers(output_range[0], output_range[1], total)
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, cv * cv / rate, total)  # mean 1/rate, std cv/rate
    arrivals = np.cumsum(gaps)
    requests = []
    for i in range(total):
        prompt = rng.integers(first_token_id, vocab_size, int(input_lens[i]))
        requests.append(WorkloadRequest(i, float(arrivals[i]), adapter_names[adapter_index[i]],
                                        int(input_lens[i]), int(output_lens[i]),
                                        tuple(int(t) for t in prompt)))
    return requests


@dataclass
class RequestRecord:
    """What a client saw of one request. Times are seconds on one monotonic clock."""

    request: WorkloadRequest
    sent: float | None = None  # when the request was handed to the server / engine
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, tokens in it)
    num_responses: int = 0  # responses (engine: callbacks) that carried tokens
    finished: bool = False
    error: str | None = None

    @property
    def num_tokens(self) -> int:
        return sum(k for _, k in self.chunks)

    @property
    def ttft(self) -> float | None:
        return self.chunks[0][0] - self.sent if self.chunks and self.sent is not None else None

    def inter_token_latencies(self) -> list[float]:
        """One value per token of the responses after the first: a response of k tokens that came
        g seconds after the previous one gives k values g/k (coalesced tokens share the gap)."""
        values = []
        for (prev, _), (now, k) in zip(self.chunks, self.chunks[1:]):
            values.extend([(now - prev) / k] * k)
        return values


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def window_token_throughputs(records: Sequence[RequestRecord], start: float, end: float,
                             window_s: float) -> list[float]:
    """Generated tokens per second in consecutive windows of ``window_s`` from ``start`` (the last
    window may be shorter; a cold start shows as a first window slower than the next)."""
    edges = list(np.arange(start, end, window_s)) + [end]
    counts = [0] * (len(edges) - 1)
    for record in records:
        for at, num_tokens in record.chunks:
            if start <= at < end:
                counts[min(int((at - start) // window_s), len(counts) - 1)] += num_tokens
    return [c / (b - a) for c, a, b in zip(counts, edges, edges[1:]) if b > a]


def summarize(records: Sequence[RequestRecord], start: float, end: float, slo_ttft_s: float = SLO_TTFT_S) -> dict:
    """Figures of one run whose requests were sent from ``start`` and whose measurement stopped
    at ``end`` (requests still running then were cancelled).

    Throughputs are over [start, end]: finished requests, and generated tokens (of all requests,
    finished or not). SLO attainment is over the requests whose outcome is known at ``end``: those
    with a first token (met if it came within ``slo_ttft_s``) and those without one that had waited
    ``slo_ttft_s`` by then (missed).
    """
    elapsed = end - start
    sent = [r for r in records if r.sent is not None]
    finished = [r for r in sent if r.finished]
    errors = [r for r in sent if r.error is not None]
    ttfts = [r.ttft for r in sent if r.ttft is not None]
    itls = [v for r in sent for v in r.inter_token_latencies()]
    tokens = sum(r.num_tokens for r in sent)
    responses = sum(r.num_responses for r in sent)
    judged = [r for r in sent if r.ttft is not None or r.sent <= end - slo_ttft_s]
    met = [r for r in judged if r.ttft is not None and r.ttft < slo_ttft_s]
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731
    return {
        "elapsed_s": elapsed,
        "num_requests": len(records),
        "num_sent": len(sent),
        "num_finished": len(finished),
        "num_errors": len(errors),
        "first_errors": sorted({r.error for r in errors})[:3],
        "request_throughput": len(finished) / elapsed,
        "token_throughput": tokens / elapsed,
        "prompt_token_throughput": sum(r.request.input_len for r in finished) / elapsed,
        "num_output_tokens": tokens,
        "ttft_ms": {f"p{q}": ms(percentile(ttfts, q)) for q in (50, 90, 99)},
        "itl_ms": {f"p{q}": ms(percentile(itls, q)) for q in (50, 90, 99)},
        "slo_ttft_s": slo_ttft_s,
        "slo_attainment": len(met) / len(judged) if judged else None,
        "responses_per_token": responses / tokens if tokens else None,
    }

