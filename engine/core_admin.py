"""The engine process's admin socket: how model ``multilora_adapters`` (another Triton stub)
reaches the engine that model ``multilora`` started.

The two models run in different stub processes of one tritonserver. The ``multilora`` stub
passes the engine process an address that both stubs can compute on their own: a ZeroMQ
``ipc://`` socket named after the serving model in a directory private to this user and this
tritonserver (``<tmp>/multilora-<uid>-<tritonserver pid>/<model>.admin``; a stub's parent is
tritonserver). The engine binds it (a ROUTER) once it is ready and removes it when it stops; the
admin stub connects one DEALER per request. No socket, or nobody listening: the engine is not
running, and the admin model answers UNAVAILABLE. The directory is created with mode 0700 and
both sides refuse one owned by another user or open to others.

``AdminServer`` runs on a thread of its own that owns the ROUTER socket; actions finish on other
threads (engine/adapter_admin.py), whose replies come back to it through an inproc socket.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import threading
from typing import Callable

import zmq

from engine import core_wire as wire

logger = logging.getLogger("multilora")
_IPC_PREFIX = "ipc://"


def admin_dir(server_pid: int, create: bool) -> str:
    """The private directory of this user's tritonserver ``server_pid``; RuntimeError if it is
    not private (another owner, or open to group or others)."""
    path = os.path.join(tempfile.gettempdir(), f"multilora-{os.getuid()}-{server_pid}")
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RuntimeError(f"{path} is not a private directory of this user: remove it")
    return path


def admin_address(server_pid: int, model_name: str, create: bool = False) -> str:
    return f"{_IPC_PREFIX}{os.path.join(admin_dir(server_pid, create), model_name + '.admin')}"


def socket_path(address: str) -> str:
    return address[len(_IPC_PREFIX):]


Handler = Callable[[wire.AdminRequest, Callable[[dict | None, Exception | None], None]], None]


class AdminServer:
    """Receives AdminRequests on ``address``, hands each to ``handler(request, reply)``, and sends
    the one AdminReply that ``reply`` is called with (from any thread)."""

    def __init__(self, context: zmq.Context, address: str, handler: Handler) -> None:
        self._context = context
        self._address = address
        self._handler = handler
        self._encoder_lock = threading.Lock()
        self._encoder = wire.Encoder()
        self._stop = threading.Event()
        self._replies_address = f"inproc://multilora-admin-replies-{id(self)}"
        self._replies_in = context.socket(zmq.PULL)
        self._replies_in.bind(self._replies_address)
        self._replies_out = context.socket(zmq.PUSH)
        self._replies_out.connect(self._replies_address)
        self._thread = threading.Thread(target=self._serve, name="multilora-admin", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._encoder_lock:
            self._replies_out.close(linger=0)
        self._replies_in.close(linger=0)

    def _reply(self, identity: bytes) -> Callable[[dict | None, Exception | None], None]:
        def reply(result: dict | None, error: Exception | None) -> None:
            message = wire.AdminReply(None if result is None else json.dumps(result), error)
            with self._encoder_lock:
                if not self._replies_out.closed:
                    self._replies_out.send_multipart([identity, self._encoder.encode(message)])
        return reply

    def _serve(self) -> None:
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        path = socket_path(self._address)
        try:
            router.bind(self._address)
        except zmq.ZMQError:
            logger.exception("the admin socket %s could not be bound: adapter administration is off", path)
            router.close()
            return
        decoder = wire.admin_request_decoder()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._replies_in, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(timeout=100))
                if self._replies_in in events:
                    while True:
                        try:
                            router.send_multipart(self._replies_in.recv_multipart(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                if router in events:
                    frames = router.recv_multipart()
                    identity, payload = frames[0], frames[-1]
                    reply = self._reply(identity)
                    try:
                        request = decoder.decode(payload)
                    except Exception as error:  # a peer that speaks something else
                        reply(None, wire.errors.InvalidRequestError(f"malformed admin message ({error})"))
                        continue
                    try:
                        self._handler(request, reply)
                    except Exception as error:
                        logger.exception("an admin request failed")
                        reply(None, wire.errors.EngineError(f"internal error: {type(error).__name__}"))
        finally:
            router.close(linger=0)
            for remove in (os.unlink, os.rmdir):  # the directory goes too once no model's socket is in it
                try:
                    remove(path if remove is os.unlink else os.path.dirname(path))
                except OSError:
                    pass
