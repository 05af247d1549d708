"""A real tritonserver on the demo model with tensor_parallel_size 2 on CPU (gloo): the follower
rank is a child of the engine process; streaming gives the adapters' outputs; a cancelled
request ends once and the engine goes idle; a rank killed mid-stream ends every live request
with one FINAL error naming it, and the model goes not-ready."""
from __future__ import annotations

import os
import signal
import time

import pytest

from e2e_helpers import MODEL_REPOSITORY, StreamClient, cmdline, descendants, is_alive, start_server
from fault_helpers import is_ready, settled_baseline, wait_for_idle
from test_cancellation import CancellableStream, endings, wait_for_endings

pytestmark = pytest.mark.e2e
LONG = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_file = tmp_path_factory.mktemp("tensor_parallel") / "tritonserver.log"
    server = start_server(MODEL_REPOSITORY, ready_timeout=180.0, log_file=log_file,
                          engine_args={"max_model_len": 4096, "tensor_parallel_size": 2})
    try:
        yield server
    finally:
        server.stop()


def ranks(server) -> tuple[int, list[int]]:
    """(engine process pid, follower rank pids)."""
    tree = descendants(server.process.pid)
    [core] = [p for p in tree if "engine.core_server" in cmdline(p)]
    return core, [p for p in descendants(core) if "engine.tp_worker" in cmdline(p)]


def test_streaming_at_tp2(server):
    core, followers = ranks(server)
    assert len(followers) == 1 and "--rank 1" in cmdline(followers[0])
    expected = {"up": ("upper", "HELLO"), "rev": ("reverse", "olleh"), "rot": ("rot13", "uryyb")}
    with StreamClient(server.grpc_url) as client:
        for rid, (lora, _) in expected.items():
            client.send(rid, text="hello", lora_name=lora, exclude_input_in_output=True,
                        sampling={"max_tokens": 8, "temperature": 0})
        responses = client.collect(list(expected))
    for rid, (_, text) in expected.items():
        assert "".join(r.text for r in responses[rid]) == text, rid
        assert [r.error for r in responses[rid]] == [None] * len(responses[rid])
        assert sum(r.final for r in responses[rid]) == 1


def test_cancel_at_tp2(server):
    baseline = settled_baseline(server.metrics_url)
    before = endings(server.metrics_url)
    client = CancellableStream(server.grpc_url)
    client.send("long", text="hello", lora_name="upper", sampling=LONG)
    assert client.first_response("long").error is None
    client.cancel()
    client.close()
    assert wait_for_endings(server, before, 1) == {"cancelled": 1}
    wait_for_idle(server.metrics_url, baseline)
    with StreamClient(server.grpc_url) as again:  # both ranks still in step
        again.send("after", text="hello", lora_name="reverse", exclude_input_in_output=True, stream=False,
                   sampling={"max_tokens": 8, "temperature": 0})
        assert again.collect(["after"])["after"][0].text == "olleh"


def test_killed_rank_mid_stream_fails_every_live_request(server):
    core, [follower] = ranks(server)
    ids = [f"r{i}" for i in range(3)]
    with StreamClient(server.grpc_url) as client:
        for i, rid in enumerate(ids):
            client.send(rid, text="hello", lora_name=["", "upper", "rot13"][i], sampling=LONG)
        seen: dict[str, list] = {rid: [] for rid in ids}
        deadline = time.monotonic() + 60
        while not all(seen.values()) and time.monotonic() < deadline:  # every request streaming
            item = client._incoming.get(timeout=60)
            seen.setdefault(item.request_id, []).append(item)
        assert all(seen.values())
        killed = time.monotonic()
        os.kill(follower, signal.SIGKILL)
        responses = client.collect(ids, timeout=10, quiet_s=0.5)
        ended = time.monotonic()
        while is_ready(server.http_url) and time.monotonic() - killed < 5:
            time.sleep(0.02)
        not_ready_after = time.monotonic() - killed
    for rid in ids:
        finals = [r for r in seen[rid] + responses[rid] if r.final]
        assert len(finals) == 1, (rid, finals)
        assert finals[0].error is not None and "tensor-parallel rank 1" in finals[0].error, finals[0].error
        assert "SIGKILL" in finals[0].error
    assert ended - killed < 2.0 + 0.5
    assert not is_ready(server.http_url) and not_ready_after < 3.0
    deadline = time.monotonic() + 5
    while is_alive(core) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert core not in descendants(server.process.pid)  # the engine process ended with its rank
