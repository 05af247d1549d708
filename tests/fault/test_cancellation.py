"""Cancellation at each stage of a request, against one real tritonserver on the demo model
(context 4096, two sequences at a time, so a third one waits).

A gRPC stream is cancelled as a whole (the RPC); the client then sees nothing more, so the one
FINAL the model sends each request is read back through the counters: every request ends
exactly once, as a success or as CANCELLED, never INTERNAL, and the pages and request gauges
return to baseline. A request cancelled after its FINAL counts as a success only.
"""
from __future__ import annotations

import time

import pytest

from e2e_helpers import MODEL, MODEL_REPOSITORY, StreamClient, metric_value, read_metrics, start_server
from fault_helpers import endings, idle_gauges, is_ready, settled_baseline, wait_for_idle

pytestmark = pytest.mark.e2e

MAX_NUM_SEQS = 2
LONG = {"max_tokens": 3000, "ignore_eos": True}
TIMEOUT_S = 30.0


class CancellableStream(StreamClient):
    """A StreamClient whose RPC can be cancelled (as tritonclient's stop_stream(cancel_requests=True))."""

    def cancel(self) -> None:
        self._call.cancel()

    def first_response(self, request_id: str, timeout: float = TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            item = self._incoming.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(item, Exception):
                raise item
            if item.request_id == request_id:
                return item
        raise AssertionError(f"no response to {request_id} within {timeout} s")


def wait_for_endings(server, before: dict[str, float], num_requests: int) -> dict[str, float]:
    """The counter deltas once ``num_requests`` requests have ended (each ends once)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        after = endings(server.metrics_url)
        deltas = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        if sum(deltas.values()) >= num_requests or time.monotonic() > deadline:
            assert sum(deltas.values()) == num_requests, deltas
            return deltas
        time.sleep(0.05)


def wait_for_gauge(server, name: str, predicate) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate(idle_gauges(server.metrics_url)[name]):
        assert time.monotonic() < deadline, f"{name} did not reach the expected value"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_file = tmp_path_factory.mktemp("fault_cancellation") / "tritonserver.log"
    server = start_server(MODEL_REPOSITORY, ready_timeout=180.0, log_file=log_file,
                          engine_args={"max_model_len": 4096, "max_num_seqs": MAX_NUM_SEQS})
    try:
        with StreamClient(server.grpc_url) as client:  # loads upper: later requests on it find it loaded
            client.send("warm", text="hello", lora_name="upper", sampling={"max_tokens": 8}, stream=False)
            client.collect(["warm"], quiet_s=0)
        server.baseline = settled_baseline(server.metrics_url)
        yield server
        assert is_ready(server.http_url)
        with StreamClient(server.grpc_url) as client:
            client.send("after", text="hello", lora_name="upper", stream=False, exclude_input_in_output=True,
                        sampling={"max_tokens": 8, "temperature": 0})
            assert client.collect(["after"])["after"][0].text == "HELLO"
        wait_for_idle(server.metrics_url, server.baseline)
    finally:
        server.stop()


def cancel_and_expect(server, client, before, endings_expected: dict[str, int]) -> None:
    """Cancel the stream, then every request has ended once as expected and the engine is idle."""
    client.cancel()
    client.close()
    assert wait_for_endings(server, before, sum(endings_expected.values())) == endings_expected
    wait_for_idle(server.metrics_url, server.baseline)


def test_cancel_the_request_its_adapter_was_loaded_for(server):
    """The first request on an adapter not loaded yet (first in this file: nothing else names
    rot13), cancelled once the load is counted. The demo's adapters load in milliseconds, so the
    load itself is not a window a test can hit every time; what follows it is."""
    loads = lambda: metric_value(read_metrics(server.metrics_url), "multilora_adapter_loads_total", model=MODEL)
    loads_before = loads()
    before = endings(server.metrics_url)
    client = CancellableStream(server.grpc_url)
    client.send("a", text="abc", lora_name="rot13", sampling=LONG)
    deadline = time.monotonic() + TIMEOUT_S
    while loads() == loads_before:
        assert time.monotonic() < deadline, "rot13 was not loaded"
        time.sleep(0.02)
    cancel_and_expect(server, client, before, {"cancelled": 1})


def test_cancel_while_queued_behind_max_num_seqs(server):
    before = endings(server.metrics_url)
    client = CancellableStream(server.grpc_url)
    ids = [f"q{i}" for i in range(MAX_NUM_SEQS + 2)]
    for request_id in ids:
        client.send(request_id, text="abc", lora_name="upper", sampling=LONG)
    wait_for_gauge(server, "multilora_num_requests_waiting", lambda v: v >= 2)
    wait_for_gauge(server, "multilora_num_requests_running", lambda v: v == MAX_NUM_SEQS)
    cancel_and_expect(server, client, before, {"cancelled": len(ids)})


def test_cancel_during_decode(server):
    before = endings(server.metrics_url)
    client = CancellableStream(server.grpc_url)
    client.send("d", text="abc", lora_name="reverse", sampling=LONG)
    first = client.first_response("d")
    assert first.error is None and first.output_ids and not first.final
    wait_for_gauge(server, "multilora_kv_blocks_used", lambda v: v > server.baseline["multilora_kv_blocks_used"])
    cancel_and_expect(server, client, before, {"cancelled": 1})


def test_cancel_during_a_long_prefill(server):
    """A prompt of 3000 tokens (the demo tokenizer: one a byte; two prefill chunks) cancelled as
    soon as the engine runs it, in prefill or early in its 1000 tokens of decode: it ends once,
    CANCELLED."""
    before = endings(server.metrics_url)
    client = CancellableStream(server.grpc_url)
    client.send("p", text="abc" * 1000, lora_name="rot13", sampling={"max_tokens": 1000, "ignore_eos": True})
    wait_for_gauge(server, "multilora_num_requests_running", lambda v: v >= 1)
    cancel_and_expect(server, client, before, {"cancelled": 1})


def test_cancel_after_completion_changes_nothing(server):
    before = endings(server.metrics_url)
    client = CancellableStream(server.grpc_url)
    client.send("c", text="hello", lora_name="upper", stream=True, exclude_input_in_output=True,
                sampling={"max_tokens": 8, "temperature": 0})
    responses = client.collect(["c"], quiet_s=0.1)["c"]
    assert [r.final for r in responses].count(True) == 1 and responses[-1].final
    assert "".join(r.text for r in responses) == "HELLO"
    cancel_and_expect(server, client, before, {"success": 1})


def test_cancel_many_streams_at_every_stage_at_once(server):
    """Streams cancelled with requests queued, decoding and finished at once: each ends once."""
    before = endings(server.metrics_url)
    clients = [CancellableStream(server.grpc_url) for _ in range(3)]
    clients[0].send("done", text="hi", lora_name="upper", sampling={"max_tokens": 4}, stream=False)
    clients[0].collect(["done"], quiet_s=0)
    for i, client in enumerate(clients):
        for j in range(2):
            client.send(f"r{i}{j}", text="abc", lora_name=["upper", "reverse", "rot13"][i], sampling=LONG)
    wait_for_gauge(server, "multilora_num_requests_waiting", lambda v: v >= 1)
    for client in clients:
        client.cancel()
        client.close()
    assert wait_for_endings(server, before, 7) == {"success": 1, "cancelled": 6}
    wait_for_idle(server.metrics_url, server.baseline)
