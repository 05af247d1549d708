"""A soak through one real tritonserver on the demo model: 2,000 requests at high concurrency
over gRPC streams, mixed over the base model and the three demo adapters, 20% of them cancelled
(before their first response, after it, or after a short wait) and 5% malformed, after a
warm-up of the same mix.

Checked: every request that is neither cancelled nor malformed gives exactly the tokens it
gives alone (greedy and seeded); every malformed one gets one FINAL error with the right code;
every request that reached the model ended once (the failure and success counters), none
INTERNAL or UNAVAILABLE; afterwards the
running, waiting and KV-page gauges are back to baseline, the model READY, and the RSS of the
Triton stub and of the engine process within 5% of what they were after the warm-up.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass

import grpc
import pytest
from tritonclient.grpc import service_pb2_grpc

from e2e_helpers import MODEL_REPOSITORY, build_request, cmdline, descendants, parse_response, start_server
from fault_helpers import endings, is_ready, settled_baseline, wait_for_idle

pytestmark = pytest.mark.e2e

NUM_WARMUP, NUM_SOAK, CONCURRENCY = 300, 2000, 64
CANCELLED, MALFORMED = 0.20, 0.05
RSS_TOLERANCE = 0.05
ADAPTERS = [None, "upper", "reverse", "rot13"]
PROMPTS = ["hello", "abc 12", "xyz", "soak test", "k9 p", "multi lora", "qwerty", "7 8 9", "tenants", "pages",
           "cancel me", "z"]
SAMPLING = [{"max_tokens": 8, "temperature": 0}, {"max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 5}]
# (lora_name, sampling, text, failure reason): each refused before any work
MALFORMED_KINDS = [
    ("upper", {"max_tokens": 8, "top_p": 2}, "hello", "invalid_arg"),
    (None, {"max_tokens": -1}, "hello", "invalid_arg"),
    ("reverse", {"max_tokens": 8, "bogus_key": 1}, "hello", "invalid_arg"),
    (None, {"max_tokens": 8, "stop": [1]}, "hello", "invalid_arg"),
    ("../upper", {"max_tokens": 8}, "hello", "invalid_arg"),
    ("no_such_adapter", {"max_tokens": 8}, "hello", "not_found"),
    (None, {"max_tokens": 8}, "x" * 5000, "invalid_arg"),  # longer than the context (64)
]


@dataclass
class Spec:
    request_id: str
    kind: str  # "normal", "cancel" or "malformed"
    lora_name: str | None
    sampling: dict
    text: str
    stream: bool = False
    cancel_after: str = ""  # "write", "first" or "delay"
    reason: str = ""


def make_specs(prefix: str, num: int, rng: random.Random) -> list[Spec]:
    specs = []
    for i in range(num):
        draw = rng.random()
        rid = f"{prefix}-{i}"
        if draw < MALFORMED:
            lora, sampling, text, reason = MALFORMED_KINDS[i % len(MALFORMED_KINDS)]
            specs.append(Spec(rid, "malformed", lora, sampling, text, reason=reason))
            continue
        lora, text, sampling = rng.choice(ADAPTERS), rng.choice(PROMPTS), rng.choice(SAMPLING)
        if draw < MALFORMED + CANCELLED:
            specs.append(Spec(rid, "cancel", lora, sampling, text, stream=True,
                              cancel_after=rng.choice(["write", "first", "delay"])))
        else:
            specs.append(Spec(rid, "normal", lora, sampling, text, stream=rng.random() < 0.5))
    return specs


def key(spec: Spec) -> tuple:
    return spec.lora_name, spec.text, tuple(sorted(spec.sampling.items()))


async def run_one(stub, spec: Spec, rng: random.Random) -> list:
    """The responses of one request on its own stream; cancelled ones as the stream is cancelled."""
    call = stub.ModelStreamInfer()
    await call.write(build_request(spec.request_id, text=spec.text, lora_name=spec.lora_name, stream=spec.stream,
                                   sampling=spec.sampling, exclude_input_in_output=True))
    responses = []
    try:
        if spec.kind == "cancel" and spec.cancel_after == "write":
            return responses
        if spec.kind == "cancel" and spec.cancel_after == "delay":
            await asyncio.sleep(rng.uniform(0, 0.03))
            return responses
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                raise AssertionError(f"{spec.request_id}: the stream ended without a FINAL")
            response = parse_response(message)
            responses.append(response)
            if response.final or spec.kind == "cancel":
                return responses
    finally:
        call.cancel()  # after a FINAL it ends the stream; before, it cancels the request


async def drive(grpc_url: str, specs: list[Spec], seed: int, concurrency: int = CONCURRENCY) -> dict[str, list]:
    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency)
    results: dict[str, list] = {}
    async with grpc.aio.insecure_channel(grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def guarded(spec: Spec) -> None:
            async with limit:
                results[spec.request_id] = await asyncio.wait_for(run_one(stub, spec, rng), timeout=60)

        await asyncio.gather(*(guarded(s) for s in specs))
    return results


def tokens_of(responses: list) -> list[int]:
    return [t for r in responses for t in r.output_ids]


def check(specs: list[Spec], results: dict[str, list], expected: dict[tuple, list[int]]) -> None:
    for spec in specs:
        responses = results[spec.request_id]
        if spec.kind == "cancel":
            continue
        finals = [r for r in responses if r.final]
        assert len(finals) == 1 and responses[-1].final, (spec, responses)
        if spec.kind == "malformed":
            assert len(responses) == 1 and responses[0].error, (spec, responses)
        else:
            assert all(r.error is None for r in responses), (spec, responses)
            assert tokens_of(responses) == expected[key(spec)], (spec, responses)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def serving_processes(server) -> dict[str, int]:
    below = descendants(server.process.pid)
    # the stub of model multilora (the engine's parent), not that of the admin model multilora_adapters
    found = {"stub": [p for p in below if "triton_python_backend_stub" in cmdline(p)
                      and os.path.join("multilora", "1", "model.py") in cmdline(p)],
             "engine": [p for p in below if "engine.core_server" in cmdline(p)]}
    assert all(len(pids) == 1 for pids in found.values()), found
    return {name: pids[0] for name, pids in found.items()}


def expected_reason_counts(specs: list[Spec]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for spec in specs:
        if spec.kind == "malformed":
            counts[spec.reason] = counts.get(spec.reason, 0) + 1
    return counts


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_file = tmp_path_factory.mktemp("fault_soak") / "tritonserver.log"
    server = start_server(MODEL_REPOSITORY, ready_timeout=180.0, log_file=log_file)
    try:
        yield server
    finally:
        server.stop()


def test_soak_with_cancellations_and_malformed_requests(server):
    started = time.monotonic()
    # what each (adapter, prompt, sampling) gives alone: the reference of every later request
    alone = [Spec(f"ref-{i}", "normal", lora, sampling, text)
             for i, (lora, text, sampling) in enumerate((a, t, s) for a in ADAPTERS for t in PROMPTS for s in SAMPLING)]
    results = asyncio.run(drive(server.grpc_url, alone, seed=0, concurrency=1))
    reference = {}
    for spec in alone:
        responses = results[spec.request_id]
        assert responses[-1].final and responses[-1].error is None, responses
        reference[key(spec)] = tokens_of(responses)
    baseline = settled_baseline(server.metrics_url)

    rng = random.Random(12)
    warmup = make_specs("warm", NUM_WARMUP, rng)
    check(warmup, asyncio.run(drive(server.grpc_url, warmup, seed=1)), reference)
    wait_for_idle(server.metrics_url, baseline, timeout=30)
    pids = serving_processes(server)
    rss_before = {name: rss_bytes(pid) for name, pid in pids.items()}
    before = endings(server.metrics_url)

    soak = make_specs("soak", NUM_SOAK, rng)
    kinds = {k: sum(s.kind == k for s in soak) for k in ("normal", "cancel", "malformed")}
    assert kinds["cancel"] >= 0.18 * NUM_SOAK and kinds["malformed"] >= 0.04 * NUM_SOAK, kinds
    soak_started = time.monotonic()
    results = asyncio.run(drive(server.grpc_url, soak, seed=2))
    soak_seconds = time.monotonic() - soak_started
    check(soak, results, reference)

    wait_for_idle(server.metrics_url, baseline, timeout=30)
    assert is_ready(server.http_url)
    deadline = time.monotonic() + 10  # the counters of the last cancellations land with the stats
    while True:
        after = endings(server.metrics_url)
        deltas = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        if sum(deltas.values()) >= NUM_SOAK or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # Each request that reached the model ended exactly once. One cancelled right after it was
    # written may never reach it (Triton drops the stream's unread requests): only those are missing.
    cancelled_at_write = sum(s.kind == "cancel" and s.cancel_after == "write" for s in soak)
    assert NUM_SOAK - cancelled_at_write <= sum(deltas.values()) <= NUM_SOAK, (deltas, cancelled_at_write)
    assert not deltas.get("internal") and not deltas.get("unavailable"), deltas
    for reason, count in expected_reason_counts(soak).items():
        assert deltas.get(reason) == count, (reason, deltas)
    # the successes beyond the normal requests are cancelled ones that had finished already
    assert kinds["normal"] <= deltas.get("success", 0), deltas
    assert deltas.get("success", 0) - kinds["normal"] + deltas.get("cancelled", 0) <= kinds["cancel"], deltas
    assert serving_processes(server) == pids  # nothing restarted
    rss_after = {name: rss_bytes(pid) for name, pid in pids.items()}
    growth = {name: rss_after[name] / rss_before[name] - 1 for name in pids}
    print(f"soak: {NUM_SOAK} requests ({kinds}) in {soak_seconds:.1f} s, {deltas}; RSS MiB before "
          f"{ {n: round(v / 2**20, 1) for n, v in rss_before.items()} } after "
          f"{ {n: round(v / 2**20, 1) for n, v in rss_after.items()} }; {time.monotonic() - started:.1f} s in all")
    assert all(g <= RSS_TOLERANCE for g in growth.values()), (growth, rss_before, rss_after)
