"""The engine process's wire, measured: one engine step's outputs from the engine to the stub.

    PYTHONPATH=. python bench/ipc.py [--outputs 256] [--tokens 2] [--repeats 2000]

For each framing, per message of ``--outputs`` RequestOutputs: encode, decode, frame size, and a
round trip through two ZeroMQ ipc:// PUSH/PULL sockets between two processes (send there, receive
and decode here, and back). ``msgspec``: engine/core_wire.py as used. ``pickle``: the standard
library's protocol 5 to and from the same dataclasses. No GPU, no torch: runs anywhere.
"""
from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import pickle  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import zmq  # noqa: E402

from engine import core_wire as wire  # noqa: E402
from engine.outputs import RequestOutput  # noqa: E402


def step_outputs(num_outputs: int, num_tokens: int) -> wire.StepOutputs:
    return wire.StepOutputs([RequestOutput(request_id=str(10_000 + i), text="ab" * num_tokens,
                                           token_ids=list(range(100, 100 + num_tokens)),
                                           num_prompt_tokens=300, num_output_tokens=57)
                             for i in range(num_outputs)])


class Msgspec:
    name = "msgspec (core_wire)"

    def __init__(self) -> None:
        self._encoder = wire.Encoder()
        self._decoder = wire.client_decoder()

    def encode(self, message) -> bytes:
        return self._encoder.encode(message)

    def decode(self, data) -> object:
        return self._decoder.decode(data)


class Pickle:
    name = "pickle protocol 5"

    def encode(self, message) -> bytes:
        return pickle.dumps(message, protocol=5)

    def decode(self, data) -> object:
        return pickle.loads(data)


def per_call_us(fn, arg, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn(arg)
    return (time.perf_counter() - start) / repeats * 1e6


def _echo(address_in: str, address_out: str, count: int) -> None:
    """The other process: receive each frame and send it back unchanged."""
    context = zmq.Context()
    inbox, out = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    inbox.connect(address_in)
    out.connect(address_out)
    for _ in range(count):
        out.send(inbox.recv(copy=False), copy=False)
    out.close(linger=1000)
    inbox.close()
    context.term()


def round_trip_us(codec, message, repeats: int) -> float:
    """Encode, send to the other process, receive its echo, decode: one message at a time."""
    with tempfile.TemporaryDirectory() as tmp:
        to_echo, from_echo = f"ipc://{tmp}/to_echo", f"ipc://{tmp}/from_echo"
        context = zmq.Context()
        out, inbox = context.socket(zmq.PUSH), context.socket(zmq.PULL)
        out.bind(to_echo)
        inbox.bind(from_echo)
        echo = multiprocessing.get_context("spawn").Process(target=_echo, args=(to_echo, from_echo, repeats + 10))
        echo.start()
        for _ in range(10):  # connections up
            out.send(codec.encode(message))
            codec.decode(inbox.recv())
        start = time.perf_counter()
        for _ in range(repeats):
            out.send(codec.encode(message), copy=False)
            codec.decode(inbox.recv(copy=False))
        elapsed = time.perf_counter() - start
        echo.join()
        out.close(linger=0)
        inbox.close(linger=0)
        context.term()
    return elapsed / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=int, default=256, help="RequestOutputs in one step message")
    parser.add_argument("--tokens", type=int, default=2, help="tokens in each output")
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    message = step_outputs(args.outputs, args.tokens)
    print(f"| framing | frame bytes | encode us | decode us | round trip us (2 processes, ZeroMQ ipc) |")
    print("|---|---:|---:|---:|---:|")
    for codec in (Msgspec(), Pickle()):
        data = codec.encode(message)
        decoded = codec.decode(data)
        assert decoded == message, f"{codec.name}: the decoded message differs"
        print(f"| {codec.name} | {len(data)} | {per_call_us(codec.encode, message, args.repeats):.0f} "
              f"| {per_call_us(codec.decode, data, args.repeats):.0f} "
              f"| {round_trip_us(codec, message, args.repeats // 4):.0f} |")
    print(f"\n{args.outputs} outputs of {args.tokens} tokens per message; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, pyzmq {zmq.__version__}; "
          f"command: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
