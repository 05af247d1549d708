"""The engine's own process behind a real tritonserver: it is a child of the stub, its death under
load ends every live request with one FINAL error within a second, the model goes not-ready, the
cause is in Triton's log, and loading the model again brings it back."""
from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request

import pytest

from e2e_helpers import (MODEL, MODEL_REPOSITORY, StreamClient, cmdline, descendants, generate,
                         start_server)

pytestmark = pytest.mark.e2e
LONG = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}


@pytest.fixture
def server(tmp_path):
    server = start_server(MODEL_REPOSITORY, ready_timeout=180.0, log_file=tmp_path / "tritonserver.log",
                          engine_args={"max_model_len": 4096}, model_control_mode="explicit")
    yield server
    server.stop()


def engine_pids(server) -> list[int]:
    return [p for p in descendants(server.process.pid) if "engine.core_server" in cmdline(p)]


def model_ready(server) -> int:
    try:
        with urllib.request.urlopen(f"{server.http_url}/v2/models/{MODEL}/ready", timeout=2) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def test_engine_runs_in_a_child_process_of_the_stub(server):
    pids = engine_pids(server)
    assert len(pids) == 1, [cmdline(p) for p in descendants(server.process.pid)]
    stubs = [p for p in descendants(server.process.pid) if "triton_python_backend_stub" in cmdline(p)]
    assert len(stubs) == 2  # multilora and its admin model multilora_adapters; the engine is under one
    assert sum(pids[0] in descendants(stub) for stub in stubs) == 1
    status, reply = generate(server.http_url, {"text_input": "hello", "lora_name": "upper",
                                                "sampling_parameters": '{"temperature": 0}'})
    assert status == 200 and reply["text_output"] == "helloHELLO"


def test_killed_engine_under_load_fails_live_requests_and_the_model_comes_back(server):
    [engine_pid] = engine_pids(server)
    ids = [f"r{i}" for i in range(4)]
    with StreamClient(server.grpc_url) as client:
        for i, request_id in enumerate(ids):
            client.send(request_id, text="hello", lora_name=["", "upper", "reverse", "rot13"][i],
                        sampling=LONG)
        seen: dict[str, list] = {rid: [] for rid in ids}
        deadline = time.monotonic() + 60
        while not all(seen.values()) and time.monotonic() < deadline:  # every request streaming
            item = client._incoming.get(timeout=60)
            seen.setdefault(item.request_id, []).append(item)
        assert all(seen.values())
        killed = time.monotonic()
        os.kill(engine_pid, signal.SIGKILL)
        responses = client.collect(ids, timeout=10, quiet_s=0.5)
        ended = time.monotonic()
        became_not_ready = None
        while time.monotonic() - killed < 5:
            if model_ready(server) != 200:
                became_not_ready = time.monotonic()
                break
            time.sleep(0.02)
    for request_id in ids:
        finals = [r for r in seen[request_id] + responses[request_id] if r.final]
        assert len(finals) == 1, (request_id, finals)
        assert finals[0].error is not None and "engine process" in finals[0].error
        assert "SIGKILL" in finals[0].error
    assert ended - killed < 1.0 + 0.5 + 0.5  # FINAL within 1 s (+ the quiet time and polling)
    assert became_not_ready is not None and became_not_ready - killed < 1.5
    deadline = time.monotonic() + 10
    while "SIGKILL" not in server.log_tail(400) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "was killed by signal 9 (SIGKILL)" in server.log_tail(400)
    assert engine_pid not in descendants(server.process.pid)  # reaped, not a zombie

    # loading the model again (explicit model control) brings a new engine process
    request = urllib.request.Request(f"{server.http_url}/v2/repository/models/{MODEL}/load", data=b"",
                                     method="POST", headers=server.admin_headers)
    with urllib.request.urlopen(request, timeout=180) as reply:
        assert reply.status == 200
    assert model_ready(server) == 200
    [new_pid] = engine_pids(server)
    assert new_pid != engine_pid
    status, reply = generate(server.http_url, {"text_input": "hello", "lora_name": "reverse",
                                                "sampling_parameters": '{"temperature": 0}'})
    assert status == 200 and reply["text_output"] == "helloolleh"
