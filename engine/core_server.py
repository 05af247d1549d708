"""The engine-core process: the engine loop in a process of its own, which owns the GPU.

Started by ``core_client.EngineCoreClient`` (the Triton stub) as
``python -m engine.core_server --ipc-dir D --engine-json F [--multi-lora-json M] [--overrides JSON]
[--admin-address A]``. It connects two ZeroMQ sockets that the client has bound under D:
``D/to_core`` (requests in) and ``D/from_core`` (outputs, stats, log lines out); core_wire.py has
the messages. With ``--admin-address`` it also binds the adapter admin socket there once ready
(engine/core_admin.py; the actions are engine/adapter_admin.py).

Threads here:
- main: receives requests, validates and tokenizes them (``AsyncEngine.add_request``; the only
  thread that encodes text), aborts them, and ends on ``Shutdown``;
- the engine loop (AsyncEngine): one ``StepOutputs`` message per step, sent without waiting
  (the send queue has no limit, so the engine never waits on the stub);
- adapter loaders (AsyncEngine), stats (every STATS_INTERVAL_S) and the parent watch.
Every send goes through one ``Sender`` (a ZeroMQ socket is not thread-safe).

Lifetime: the process dies with its parent (PR_SET_PDEATHSIG, and a watch on the parent's pid),
sends ``Fatal`` and exits when the engine cannot go on, and exits 0 after ``Shutdown``.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Sequence

import zmq

from engine import core_wire as wire
from engine.outputs import RequestOutput

logger = logging.getLogger("multilora")
PARENT_POLL_S = 0.5
EXIT_FATAL = 70  # the engine failed (a step raised, or it could not start)
LINGER_MS = 2000  # how long a closing socket may still deliver what is queued


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere the pid watch remains)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def ipc_address(ipc_dir: str, name: str) -> str:
    return f"ipc://{os.path.join(ipc_dir, name)}"


class Sender:
    """The one way out of this process: encodes and queues a message, never blocks."""

    def __init__(self, socket: zmq.Socket) -> None:
        self._socket = socket
        self._encoder = wire.Encoder()
        self._lock = threading.Lock()

    def send(self, message) -> None:
        with self._lock:
            self._socket.send(self._encoder.encode(message), copy=False)


class ForwardingHandler(logging.Handler):
    """Engine log lines to the client, which writes them to Triton's log."""

    def __init__(self, sender: Sender) -> None:
        super().__init__(logging.INFO)
        self._sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sender.send(wire.LogRecord(record.levelno, self.format(record)))
        except Exception:  # a closed socket at exit: nowhere left to say it
            pass


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(EXIT_FATAL)
        time.sleep(PARENT_POLL_S)


def _publish_stats(engine, sender: Sender, stop: threading.Event) -> None:
    while not stop.wait(wire.STATS_INTERVAL_S):
        sender.send(wire.Stats(engine.stats()))


def serve(ipc_dir: str, engine_json: str, multi_lora_json: str | None, overrides: dict,
          parent_pid: int, admin_address: str | None = None) -> int:
    die_with_parent()
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="multilora-parent-watch",
                     daemon=True).start()
    context = zmq.Context(io_threads=1)
    out = context.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 0)  # no limit: the engine loop never waits on the stub
    out.setsockopt(zmq.LINGER, LINGER_MS)
    out.connect(ipc_address(ipc_dir, "from_core"))
    inbox = context.socket(zmq.PULL)
    inbox.setsockopt(zmq.RCVHWM, 0)
    inbox.connect(ipc_address(ipc_dir, "to_core"))
    sender = Sender(out)
    handler = ForwardingHandler(sender)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    started = time.monotonic()
    from engine.async_engine import AsyncEngine  # torch and the model: after the sockets are up
    from engine.sampling_params import SamplingParams
    from engine.tp_runner import on_worker_death
    try:
        engine = AsyncEngine.from_files(engine_json, multi_lora_json, overrides)
        engine.step_sink = lambda outputs: sender.send(wire.StepOutputs(outputs))
        fatal = threading.Event()

        def on_fatal(message: str) -> None:
            sender.send(wire.Fatal(f"the engine stopped after an internal error: {message}"))
            fatal.set()  # the main thread notices it within a poll interval and exits

        engine.on_fatal = on_fatal
        engine.start()
        # a dead tensor-parallel rank leaves the others waiting in a collective: end at once
        on_worker_death(engine.engine.runner, lambda message: _rank_died(sender, message))
    except Exception:
        sender.send(wire.Fatal(f"the engine could not start:\n{traceback.format_exc()}"))
        _close(context, out, inbox)
        return EXIT_FATAL
    sender.send(wire.Ready(os.getpid(), engine.max_model_len, time.monotonic() - started))
    logger.info("engine core %d ready in %.1f s", os.getpid(), time.monotonic() - started)
    stop_stats = threading.Event()
    threading.Thread(target=_publish_stats, args=(engine, sender, stop_stats),
                     name="multilora-stats", daemon=True).start()
    admin_server = _start_admin(context, admin_address, engine, engine_json)

    decoder = wire.core_decoder()
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    code = 0
    while True:
        if fatal.is_set():
            code = EXIT_FATAL
            break
        if not poller.poll(timeout=100):
            continue
        message = decoder.decode(inbox.recv(copy=False))
        if isinstance(message, wire.Shutdown):
            break
        if isinstance(message, wire.AbortRequest):
            engine.abort(message.request_id)
            continue
        _add(engine, sender, message, SamplingParams)
    stop_stats.set()
    if admin_server is not None:
        admin_server.stop()
    engine.shutdown()
    engine.engine.lora.close()
    logger.removeHandler(handler)
    _close(context, out, inbox)
    if code == EXIT_FATAL:  # what was sent is out; a broken torch.distributed group makes the exit slow
        os._exit(code)
    return code


def _rank_died(sender: Sender, message: str) -> None:
    sender.send(wire.Fatal(f"the engine stopped: {message}"))
    time.sleep(0.2)  # ZeroMQ's I/O thread sends it
    os._exit(EXIT_FATAL)


def _start_admin(context: zmq.Context, address: str | None, engine, engine_json: str):
    if not address:
        return None
    from engine.adapter_admin import AdapterAdmin
    from engine.core_admin import AdminServer
    from engine.tenants import rules_next_to

    admin = AdapterAdmin(engine, rules_next_to(engine_json))
    server = AdminServer(context, address, lambda request, reply: admin.handle(
        request.request, request.authorization, request.adapter_config, request.adapter_weights, reply))
    server.start()
    return server


def _close(context: zmq.Context, out: zmq.Socket, inbox: zmq.Socket) -> None:
    """``out`` still delivers what is queued (up to LINGER_MS); ``term`` waits for every socket."""
    inbox.close(linger=0)
    out.close()
    context.term()


def _add(engine, sender: Sender, message: wire.AddRequest, params_cls) -> None:
    request_id = message.request_id

    def on_output(output: RequestOutput) -> None:
        sender.send(wire.StepOutputs([output]))

    try:
        params = params_cls(**message.params)
        engine.add_request(request_id, message.prompt, message.prompt_token_ids, params,
                           message.lora_name, on_output)
    except Exception as error:  # EngineError for the client; anything else is a bug, logged
        if not isinstance(error, wire.errors.EngineError):
            logger.exception("request %s could not be added", request_id)
            error = wire.errors.EngineError(f"internal engine error: {error}")
        on_output(RequestOutput(request_id=request_id, finished=True, finish_reason="error",
                                error=error))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ipc-dir", required=True)
    parser.add_argument("--engine-json", required=True)
    parser.add_argument("--multi-lora-json", default=None)
    parser.add_argument("--overrides", default="{}", help="a JSON object laid over engine.json")
    parser.add_argument("--parent-pid", type=int, default=os.getppid())
    parser.add_argument("--admin-address", default=None, help="ipc:// address of the adapter admin socket")
    args = parser.parse_args(argv)
    return serve(args.ipc_dir, args.engine_json, args.multi_lora_json, json.loads(args.overrides),
                 args.parent_pid, args.admin_address)


if __name__ == "__main__":
    sys.exit(main())
