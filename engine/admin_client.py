"""The admin model's side of the engine's admin socket (engine/core_admin.py): one request, one
reply. No torch: the ``multilora_adapters`` stub imports this."""
from __future__ import annotations

import time
from typing import Callable

import zmq

from engine import core_wire as wire
from engine.errors import EngineUnavailableError

CONNECT_TIMEOUT_S = 1.0
REPLY_POLL_S = 0.5


def not_running(model_name: str) -> EngineUnavailableError:
    return EngineUnavailableError(f"model '{model_name}' is not loaded (its engine is not running): load it, "
                                  "then retry")


def call(address: str, request: wire.AdminRequest, model_name: str, timeout: float,
         is_alive: Callable[[], bool] = lambda: True) -> wire.AdminReply:
    """Send ``request`` and wait for its reply. EngineUnavailableError when no engine listens,
    when ``is_alive()`` turns false meanwhile, or after ``timeout`` seconds."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.IMMEDIATE, 1)  # POLLOUT only once a listener has accepted the connection
    try:
        socket.connect(address)
        if not socket.poll(int(CONNECT_TIMEOUT_S * 1000), zmq.POLLOUT):
            raise not_running(model_name)
        socket.send(wire.Encoder().encode(request), zmq.NOBLOCK)
        deadline = time.monotonic() + timeout
        while not socket.poll(int(REPLY_POLL_S * 1000), zmq.POLLIN):
            if not is_alive():
                raise not_running(model_name)
            if time.monotonic() > deadline:
                raise EngineUnavailableError(f"no answer from the engine of model '{model_name}' within "
                                             f"{timeout:.0f} s; see the server's log")
        return wire.admin_reply_decoder().decode(socket.recv())
    except zmq.ZMQError as error:
        raise EngineUnavailableError(f"the engine of model '{model_name}' cannot be reached ({error})") from error
    finally:
        socket.close(linger=0)
