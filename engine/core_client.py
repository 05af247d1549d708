"""The Triton stub's side of the engine-core process: start it, send requests, receive outputs.

The stub no longer runs the engine: ``EngineCoreClient.start`` binds two ZeroMQ sockets in a
private directory, starts ``python -m engine.core_server`` (the interpreter of the stub's own
environment) and waits for its ``Ready``. Then:
- ``add_request`` / ``abort`` queue a message and return at once (callable from any thread);
- a receiver thread decodes what the core sends: each step's outputs go to ``on_outputs``, log
  lines to ``on_log``, stats are kept for ``stats()``;
- a watcher thread waits on the process: if it exits without being asked to (killed, crashed,
  or after a ``Fatal``), ``on_death`` is called once with what happened.
Nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import zmq

from engine import core_wire as wire
from engine.core_server import ipc_address
from engine.engine_stats import EngineStats
from engine.errors import EngineError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

RECV_POLL_MS = 200
SHUTDOWN_TIMEOUT_S = 30.0


class EngineCoreError(RuntimeError):
    """The engine-core process could not start; the message says why (its traceback included)."""


def python_executable() -> str:
    """The interpreter of the running environment. Inside the Triton stub ``sys.executable`` may
    be the stub itself; ``sys.prefix`` is the environment the stub took its packages from."""
    for candidate in (sys.executable, os.path.join(sys.prefix, "bin", "python3"),
                      shutil.which("python3")):
        if candidate and os.path.basename(candidate).startswith("python") and os.access(candidate, os.X_OK):
            return candidate
    raise EngineCoreError(f"no Python interpreter found for the engine process (sys.prefix {sys.prefix})")


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class EngineCoreClient:
    def __init__(self, engine_json: str, multi_lora_json: str | None, overrides: dict[str, Any],
                 on_outputs: Callable[[list[RequestOutput]], None],
                 on_log: Callable[[int, str], None],
                 on_death: Callable[[str], None], core_module: str = "engine.core_server",
                 admin_address: str | None = None) -> None:
        """``core_module``: what ``python -m`` runs (tests run the core with injected faults);
        ``admin_address``: where the core listens for the adapter admin model (engine/core_admin.py)."""
        self._args = (engine_json, multi_lora_json, overrides)
        self._admin_address = admin_address
        self._core_module = core_module
        self._on_outputs, self._on_log, self._on_death = on_outputs, on_log, on_death
        self._context: zmq.Context | None = None
        self._to_core: zmq.Socket | None = None
        self._from_core: zmq.Socket | None = None
        self._send_lock = threading.Lock()
        self._encoder = wire.Encoder()
        self._ipc_dir: str | None = None
        self.process: subprocess.Popen | None = None
        self._ready = threading.Event()
        self._ready_message: wire.Ready | None = None
        self._fatal: str | None = None
        self._stats = EngineStats()
        self._stopping = threading.Event()  # shutdown() asked the core to stop: not a death
        self._closing = threading.Event()  # the receiver may end
        self._dead: str | None = None  # why the process is gone
        self._death_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # --- life cycle -----------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> None:
        """Start the core process and wait until its engine is loaded (or raise EngineCoreError)."""
        engine_json, multi_lora_json, overrides = self._args
        self._ipc_dir = tempfile.mkdtemp(prefix="multilora-core-")  # mode 0700: this user only
        self._context = zmq.Context(io_threads=1)
        self._to_core = self._context.socket(zmq.PUSH)
        self._to_core.setsockopt(zmq.SNDHWM, 0)
        self._to_core.setsockopt(zmq.LINGER, 0)
        self._to_core.bind(ipc_address(self._ipc_dir, "to_core"))
        self._from_core = self._context.socket(zmq.PULL)
        self._from_core.setsockopt(zmq.RCVHWM, 0)
        self._from_core.bind(ipc_address(self._ipc_dir, "from_core"))
        command = [python_executable(), "-m", self._core_module, "--ipc-dir", self._ipc_dir,
                   "--engine-json", engine_json, "--overrides", json.dumps(overrides),
                   "--parent-pid", str(os.getpid())]
        if multi_lora_json:
            command += ["--multi-lora-json", multi_lora_json]
        if self._admin_address:
            command += ["--admin-address", self._admin_address]
        env = dict(os.environ)
        # The stub's interpreter ignores PYTHONPATH and builds sys.path itself: the core gets the same.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
        for target, name in ((self._receive_loop, "multilora-core-receiver"),
                             (self._watch_process, "multilora-core-watch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self._dead is not None:
                self.shutdown()
                raise EngineCoreError(self._fatal or f"the engine process {self._dead}")
            if deadline is not None and time.monotonic() > deadline:
                self.shutdown()
                raise EngineCoreError(f"the engine process was not ready after {timeout:.0f} s")

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Ask the core to stop (its live requests end with errors first), then make sure it has."""
        self._stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            try:
                self._send(wire.Shutdown())
            except Exception:
                pass
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._closing.set()  # the receiver takes what is left (the core's last log lines) and ends
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        for sock in (self._to_core, self._from_core):
            if sock is not None:
                sock.close(linger=0)
        self._to_core = self._from_core = None
        if self._context is not None:
            self._context.term()
            self._context = None
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None

    # --- requests ---------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self._ready_message.max_model_len

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def startup_seconds(self) -> float:
        return self._ready_message.startup_seconds

    @property
    def dead(self) -> str | None:
        """None while the core runs; else what happened to it."""
        return self._dead

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                    params: SamplingParams, lora_name: str | None) -> None:
        """Queue a request; its outputs (errors included) arrive through ``on_outputs``."""
        if self._dead is not None:
            raise EngineError(f"the engine process {self._dead}")
        self._send(wire.AddRequest(request_id, prompt, prompt_token_ids, dataclasses.asdict(params),
                                   lora_name))

    def abort(self, request_id: str) -> None:
        if self._dead is None:
            self._send(wire.AbortRequest(request_id))

    def stats(self) -> EngineStats:
        return self._stats  # replaced whole by the receiver thread, never changed in place

    # --- threads ----------------------------------------------------------------------------
    def _send(self, message) -> None:
        with self._send_lock:
            self._to_core.send(self._encoder.encode(message), copy=False)

    def _receive_loop(self) -> None:
        decoder = wire.client_decoder()
        sock = self._from_core
        while True:
            if not sock.poll(0 if self._closing.is_set() else RECV_POLL_MS):
                if self._closing.is_set():
                    return
                continue
            message = decoder.decode(sock.recv(copy=False))
            if isinstance(message, wire.StepOutputs):
                self._on_outputs(message.outputs)
            elif isinstance(message, wire.Stats):
                self._stats = message.stats
            elif isinstance(message, wire.LogRecord):
                self._on_log(message.level, message.message)
            elif isinstance(message, wire.Ready):
                self._ready_message = message
                self._ready.set()
            elif isinstance(message, wire.Fatal):
                self._fatal = message.message
                self._on_log(logging.ERROR, message.message)

    def _watch_process(self) -> None:
        code = self.process.wait()
        if self._stopping.is_set():
            return
        time.sleep(0.05)  # let the receiver take what the process sent last (a Fatal)
        what = f"{self.process.pid} {describe_exit(code)}"
        if self._fatal and self._ready.is_set():
            what += f" ({self._fatal.splitlines()[0]})"
        with self._death_lock:
            if self._dead is not None:
                return
            self._dead = what
        if self._ready.is_set():
            self._on_death(f"the engine process {what}")
