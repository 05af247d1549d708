"""The wire format between the engine-core process (core_server.py) and its client in the Triton
stub (core_client.py): msgpack through msgspec, one frame per message.

Client -> core: ``AddRequest``, ``AbortRequest``, ``Shutdown``; on the admin socket
(engine/core_admin.py) ``AdminRequest``, answered by one ``AdminReply``.
Core -> client: ``Ready`` once, then ``StepOutputs`` (every output of one engine step, or one
output made outside the loop such as an adapter that failed to load), ``Stats`` (every
``STATS_INTERVAL_S``), ``LogRecord`` (the core's log lines, for Triton's log) and ``Fatal`` (the
engine cannot go on; the process exits after it).

``RequestOutput`` and ``EngineStats`` are dataclasses that msgspec encodes and decodes natively;
an output's ``error`` travels as ``[class name, message]`` and comes back as the same
``engine.errors`` class (any other class as ``EngineError``). Chosen by measurement
(bench/ipc.py, one step of 256 outputs, 2-core dev machine): encode 0.09 ms, decode 0.52 ms,
round trip between two processes 0.87 ms, against pickle's 0.67, 1.29 and 2.04 ms; and a msgpack
frame cannot run code when it is read. Its frames are larger (48 kB against 19 kB: each output
carries its field names), which costs nothing measurable over a local socket.
"""
from __future__ import annotations

from typing import Any, Union

import msgspec

from engine import errors
from engine.engine_stats import EngineStats
from engine.outputs import RequestOutput

STATS_INTERVAL_S = 0.1


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    params: dict[str, Any]  # SamplingParams fields, validated by the client already
    lora_name: str | None


class AbortRequest(msgspec.Struct, tag="abort", array_like=True):
    request_id: str


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class Ready(msgspec.Struct, tag="ready", array_like=True):
    pid: int
    max_model_len: int
    startup_seconds: float


class StepOutputs(msgspec.Struct, tag="outputs", array_like=True):
    outputs: list[RequestOutput]


class Stats(msgspec.Struct, tag="stats", array_like=True):
    stats: EngineStats


class LogRecord(msgspec.Struct, tag="log", array_like=True):
    level: int  # logging.INFO, ...
    message: str


class Fatal(msgspec.Struct, tag="fatal", array_like=True):
    message: str


class AdminRequest(msgspec.Struct, tag="admin", array_like=True):
    """An action of the adapter admin model (model multilora_adapters), on the admin socket."""

    request: str  # the JSON of the ``request`` input
    authorization: str | None  # the forwarded ``authorization`` header ("Bearer ...")
    adapter_config: bytes | None = None  # upload: adapter_config.json
    adapter_weights: bytes | None = None  # upload: adapter_model.safetensors


class AdminReply(msgspec.Struct, tag="admin_reply", array_like=True):
    response: str | None  # JSON, or None with ``error``
    error: Exception | None = None


ToCore = Union[AddRequest, AbortRequest, Shutdown]
FromCore = Union[Ready, StepOutputs, Stats, LogRecord, Fatal]


def _enc_hook(value: Any) -> Any:
    if isinstance(value, BaseException):
        return [type(value).__name__, str(value)]
    raise NotImplementedError(f"cannot send a {type(value).__name__} to or from the engine core")


def _dec_hook(type_: type, value: Any) -> Any:
    if type_ is Exception:
        name, message = value
        cls = getattr(errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.EngineError)):
            cls = errors.EngineError
        return cls(message)
    raise NotImplementedError(f"cannot decode a {type_}")


class Encoder:
    """One per thread that sends (msgspec encoders keep a buffer)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)

    def encode(self, message: msgspec.Struct) -> bytes:
        return self._encoder.encode(message)


def core_decoder() -> msgspec.msgpack.Decoder:
    """Decodes what the client sends to the core."""
    return msgspec.msgpack.Decoder(ToCore, dec_hook=_dec_hook)


def admin_request_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(AdminRequest, dec_hook=_dec_hook)


def admin_reply_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(AdminReply, dec_hook=_dec_hook)


def client_decoder() -> msgspec.msgpack.Decoder:
    """Decodes what the core sends to the client."""
    return msgspec.msgpack.Decoder(FromCore, dec_hook=_dec_hook)
