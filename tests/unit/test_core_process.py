"""The engine-core process (engine/core_server.py) driven through its client (engine/core_client.py)
on the demo model: outputs, a killed process, a failed step, a failed start, a dead parent."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.core_client import EngineCoreClient, EngineCoreError
from engine.errors import AdapterNotFoundError, EngineError, InvalidRequestError
from engine.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
VERSION_DIR = ROOT / "model_repository" / "multilora" / "1"
ENGINE_JSON = str(VERSION_DIR / "engine.json")
MULTI_LORA_JSON = str(VERSION_DIR / "multi_lora.json")
LONG = {"max_model_len": 4096}  # room for requests that are still running when the process dies
GREEDY = SamplingParams(max_tokens=16, temperature=0)


class Collector:
    """The client's callbacks: outputs per request, log lines, the death notice."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.outputs: dict[str, list] = {}
        self.logs: list[tuple[int, str]] = []
        self.death: str | None = None
        self.death_time: float | None = None

    def on_outputs(self, outputs) -> None:
        with self.lock:
            for out in outputs:
                self.outputs.setdefault(out.request_id, []).append(out)
            self.lock.notify_all()

    def on_log(self, level: int, message: str) -> None:
        with self.lock:
            self.logs.append((level, message))

    def on_death(self, message: str) -> None:
        with self.lock:
            self.death, self.death_time = message, time.monotonic()
            self.lock.notify_all()

    def wait(self, predicate, timeout: float = 60.0) -> None:
        with self.lock:
            assert self.lock.wait_for(predicate, timeout), "timed out"

    def finished(self, request_id: str) -> bool:
        outs = self.outputs.get(request_id, [])
        return bool(outs) and outs[-1].finished

    def text(self, request_id: str) -> str:
        return "".join(o.text for o in self.outputs[request_id])


def start_client(collector: Collector, overrides=None, **kwargs) -> EngineCoreClient:
    client = EngineCoreClient(ENGINE_JSON, MULTI_LORA_JSON, dict(overrides or {}),
                              on_outputs=collector.on_outputs, on_log=collector.on_log,
                              on_death=collector.on_death, **kwargs)
    client.start(timeout=120)
    return client


def test_requests_through_the_process_and_its_logs():
    collector = Collector()
    client = start_client(collector)
    try:
        assert client.pid != os.getpid() and client.max_model_len > 0
        expected = {"base": (None, "hello"), "up": ("upper", "HELLO"), "rev": ("reverse", "olleh")}
        for request_id, (adapter, _) in expected.items():
            client.add_request(request_id, "hello", None, GREEDY, adapter)
        hi_ids = AutoTokenizer.from_pretrained(ROOT / "demo" / "base")("hi")["input_ids"]
        client.add_request("ids", None, hi_ids, GREEDY, "upper")
        client.add_request("unknown", "hello", None, GREEDY, "no_such_adapter")
        client.add_request("too_long", "hello", None, SamplingParams(max_tokens=100_000), None)
        collector.wait(lambda: all(collector.finished(r) for r in [*expected, "ids", "unknown", "too_long"]))
        for request_id, (_, text) in expected.items():
            assert collector.text(request_id) == text
            assert collector.outputs[request_id][-1].error is None
            assert collector.outputs[request_id][-1].finish_reason == "stop"
        assert collector.text("ids") == "HI"
        assert isinstance(collector.outputs["unknown"][-1].error, AdapterNotFoundError)
        assert isinstance(collector.outputs["too_long"][-1].error, InvalidRequestError)
        assert "max_tokens" in str(collector.outputs["too_long"][-1].error)
        # the engine's own log lines came across, with their levels
        assert any("pool of" in m for _, m in collector.logs), collector.logs
        # stats come every 0.1 s; until the first arrives the client holds empty ones (all zeros),
        # which a loaded machine showed once: wait for a snapshot taken after the steps
        deadline = time.monotonic() + 5
        stats = client.stats()
        while (stats.num_running or not stats.steps_total) and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = client.stats()
        assert stats.steps_total > 0 and stats.num_running == 0 and stats.num_kv_blocks_used == 0
    finally:
        client.shutdown()
    assert client.process.returncode == 0
    assert collector.death is None  # asked to stop: no death notice
    # the core's last log lines, written as it stops, still reach the client
    assert any(m.startswith("engine loop: ") and "steps in" in m for _, m in collector.logs), collector.logs[-3:]


def test_killed_process_is_noticed_at_once():
    collector = Collector()
    client = start_client(collector, LONG)
    try:
        client.add_request("long", "hello", None, SamplingParams(max_tokens=3000, ignore_eos=True), None)
        collector.wait(lambda: "long" in collector.outputs)
        killed = time.monotonic()
        os.kill(client.pid, signal.SIGKILL)
        collector.wait(lambda: collector.death is not None, timeout=5)
        assert collector.death_time - killed < 1.0
        assert "SIGKILL" in collector.death
        assert client.dead is not None
        with pytest.raises(EngineError, match="SIGKILL"):
            client.add_request("after", "hello", None, GREEDY, None)
    finally:
        client.shutdown()


def test_failed_step_fails_live_requests_and_ends_the_process(monkeypatch):
    monkeypatch.setenv("MULTILORA_TEST_FAIL_AT_STEP", "4")
    collector = Collector()
    client = start_client(collector, LONG, core_module="core_with_faults")
    try:
        for i in range(3):
            client.add_request(f"r{i}", "hello", None, SamplingParams(max_tokens=500, ignore_eos=True), None)
        collector.wait(lambda: collector.death is not None, timeout=30)
        for i in range(3):
            last = collector.outputs[f"r{i}"][-1]
            assert last.finished and isinstance(last.error, EngineError)
            assert "injected step failure" in str(last.error)
        assert "code 70" in collector.death and "injected step failure" in collector.death
        assert any(level >= 40 and "injected step failure" in m for level, m in collector.logs)
    finally:
        client.shutdown()
    assert client.process.returncode == 70


def test_start_failure_says_why(tmp_path):
    engine_json = tmp_path / "engine.json"
    engine_json.write_text(json.dumps({"model": str(tmp_path / "missing_model")}))
    client = EngineCoreClient(str(engine_json), None, {}, on_outputs=lambda o: None,
                              on_log=lambda level, m: None, on_death=lambda m: None)
    with pytest.raises(EngineCoreError, match="could not start"):
        client.start(timeout=120)
    assert client.process.poll() is not None


PARENT = """
import sys, time
from engine.core_client import EngineCoreClient
client = EngineCoreClient(sys.argv[1], None, {}, on_outputs=lambda o: None, on_log=lambda l, m: None,
                          on_death=lambda m: None)
client.start(timeout=120)
print(client.pid, flush=True)
time.sleep(600)
"""


def test_core_dies_with_its_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT, ENGINE_JSON], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        core_pid = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(core_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(core_pid), "the engine process outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
