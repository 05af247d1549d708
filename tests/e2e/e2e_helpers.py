"""Helpers of the end-to-end tests: starting servers, a raw gRPC stream that
attributes every response (errors included) to its request id, the generate endpoints, and a
Prometheus metrics reader."""
from __future__ import annotations

import json
import os
import queue
import shutil
import struct
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from multilora_serve.launcher import TritonServer

MODEL = "multilora"
ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = ROOT / "model_repository"
MODEL_DIR = MODEL_REPOSITORY / "multilora"
START_TIMEOUT_S = 60.0


def start_server(repository: Path, ready_timeout: float = START_TIMEOUT_S, **kwargs) -> TritonServer:
    """A started server on loopback with free ports (stop it!)."""
    return TritonServer(repository, host="127.0.0.1", http_port=None, grpc_port=None,
                        metrics_port=None, ready_timeout=ready_timeout, exit_timeout_s=5,
                        **kwargs).start()


def copy_model_repository(root: Path, engine_json: dict) -> Path:
    """A copy of the multilora model with another engine.json (paths in it must be absolute)."""
    version_dir = root / "multilora" / "1"
    version_dir.mkdir(parents=True)
    shutil.copy(MODEL_DIR / "config.pbtxt", root / "multilora" / "config.pbtxt")
    for source in (MODEL_DIR / "1").glob("*.py"):
        shutil.copy(source, version_dir / source.name)
    shutil.copy(MODEL_DIR / "1" / "multi_lora.json", version_dir / "multi_lora.json")
    (version_dir / "engine.json").write_text(json.dumps(engine_json))
    return root


def copy_admin_model(root: Path) -> Path:
    """The adapter admin model, beside a copied multilora model."""
    shutil.copytree(MODEL_REPOSITORY / "multilora_adapters", root / "multilora_adapters")
    return root


@dataclass
class Response:
    request_id: str
    final: bool
    error: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(self.outputs.get("text_output", []))

    @property
    def output_ids(self) -> list[int]:
        return [int(t) for t in self.outputs.get("output_ids", [])]


class StreamClient:
    """One gRPC ModelStreamInfer stream through tritonclient's generated stubs.

    tritonclient's own stream callback gets errors without their request id; this client reads
    the raw ModelStreamInferResponse, so tests can check "exactly one FINAL per request" for
    errors too. Requests ask for ``triton_enable_empty_final_response`` so that every response
    says whether it is final.
    """

    def __init__(self, url: str, metadata: dict[str, str] | None = None) -> None:
        """``metadata``: gRPC headers of the stream (e.g. ``authorization``)."""
        self._channel = grpc.insecure_channel(url)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._outgoing: queue.Queue = queue.Queue()
        self._incoming: queue.Queue = queue.Queue()
        self._call = stub.ModelStreamInfer(iter(self._outgoing.get, None),
                                           metadata=tuple((metadata or {}).items()) or None)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def send(self, request_id: str, text: str | None = None, input_ids: list[int] | None = None,
             lora_name: str | None = None, stream: bool = True, sampling: Any = None,
             parameters: dict[str, Any] | None = None, requested_outputs: tuple[str, ...] = (),
             **bool_inputs: bool) -> None:
        """Arguments as ``build_request``."""
        self._outgoing.put(build_request(request_id, text, input_ids, lora_name, stream, sampling, parameters,
                                         requested_outputs, **bool_inputs))

    def collect(self, request_ids: list[str], timeout: float = 60.0,
                quiet_s: float = 0.3) -> dict[str, list[Response]]:
        """All responses of ``request_ids`` until each has a final one, then ``quiet_s`` more
        seconds (so that anything sent after a FINAL would be seen)."""
        by_id: dict[str, list[Response]] = {rid: [] for rid in request_ids}
        deadline = time.monotonic() + timeout
        quiet_until = None
        while True:
            finished = all(any(r.final for r in rs) for rs in by_id.values())
            if finished and quiet_until is None:
                quiet_until = time.monotonic() + quiet_s
            limit = quiet_until if quiet_until is not None else deadline
            remaining = limit - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._incoming.get(timeout=remaining)
            except queue.Empty:
                continue
            if isinstance(item, Exception):
                raise item
            by_id.setdefault(item.request_id, []).append(item)
        missing = [rid for rid, rs in by_id.items() if not any(r.final for r in rs)]
        assert not missing, f"no final response within {timeout} s for {missing}"
        return by_id

    def close(self) -> None:
        self._outgoing.put(None)
        self._channel.close()

    def __enter__(self) -> "StreamClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read(self) -> None:
        try:
            for message in self._call:
                self._incoming.put(parse_response(message))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self._incoming.put(error)


def build_request(request_id: str, text: str | None = None, input_ids: list[int] | None = None,
                  lora_name: str | None = None, stream: bool = True, sampling: Any = None,
                  parameters: dict[str, Any] | None = None, requested_outputs: tuple[str, ...] = (),
                  **bool_inputs: bool) -> Any:
    """A ModelInferRequest of the multilora model. ``sampling``: a dict (sent as JSON) or a str
    (sent as is); ``requested_outputs``: the outputs to ask for (none: all of them). It asks for
    ``triton_enable_empty_final_response``, so every response says whether it is final."""
    request = service_pb2.ModelInferRequest(model_name=MODEL, id=request_id)
    for name in requested_outputs:
        request.outputs.add().name = name
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    for key, value in (parameters or {}).items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, int):
            request.parameters[key].int64_param = value
        else:
            request.parameters[key].string_param = str(value)
    if text is not None:
        _add_bytes(request, "text_input", [text.encode()])
    if input_ids is not None:
        _add_raw(request, "input_ids", "INT32", np.asarray(input_ids, dtype=np.int32))
    if lora_name is not None:
        _add_bytes(request, "lora_name", [lora_name.encode()])
    if sampling is not None:
        value = sampling if isinstance(sampling, str) else json.dumps(sampling)
        _add_bytes(request, "sampling_parameters", [value.encode()])
    _add_raw(request, "stream", "BOOL", np.asarray([stream], dtype=np.bool_))
    for name, value in bool_inputs.items():
        _add_raw(request, name, "BOOL", np.asarray([value], dtype=np.bool_))
    return request


def generate(http_url: str, body: dict[str, Any], stream: bool = False,
             timeout: float = 60.0, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST /generate (one JSON object back) or /generate_stream (a list of SSE events)."""
    path = "generate_stream" if stream else "generate"
    request = urllib.request.Request(f"{http_url}/v2/models/{MODEL}/{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            status, text = reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    if not stream:
        return status, json.loads(text)
    events = [json.loads(line[len("data: "):]) for line in text.splitlines()
              if line.startswith("data: ")]
    return status, events


def read_metrics(metrics_url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> {name: [(labels, value), ...]}."""
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    metrics: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, label_text = head.partition("{")
        labels = {}
        for part in label_text.rstrip("}").split(","):
            if "=" in part:
                key, _, raw = part.partition("=")
                labels[key] = raw.strip('"')
        metrics.setdefault(name, []).append((labels, float(value)))
    return metrics


def metric_value(metrics: dict, name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels`` (0 when absent)."""
    return sum(value for series_labels, value in metrics.get(name, [])
               if all(series_labels.get(k) == v for k, v in labels.items()))


def wait_for_metric(metrics_url: str, name: str, predicate, timeout: float = 15.0) -> float:
    """Poll until ``predicate(value)`` holds (gauges are refreshed periodically)."""
    deadline = time.monotonic() + timeout
    while True:
        value = metric_value(read_metrics(metrics_url), name, model=MODEL)
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} = {value} did not reach the expected value in {timeout} s")
        time.sleep(0.05)


def _add_bytes(request: Any, name: str, values: list[bytes]) -> None:
    _add_raw(request, name, "BYTES", None,
             b"".join(struct.pack("<I", len(v)) + v for v in values), [len(values)])


def _add_raw(request: Any, name: str, datatype: str, array: np.ndarray | None,
             raw: bytes | None = None, shape: list[int] | None = None) -> None:
    tensor = request.inputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(shape if shape is not None else list(array.shape))
    request.raw_input_contents.append(raw if raw is not None else array.tobytes())


def parse_response(message: Any) -> Response:
    infer = message.infer_response
    final = infer.parameters["triton_final_response"].bool_param \
        if "triton_final_response" in infer.parameters else False
    if message.error_message:
        return Response(infer.id, final, error=message.error_message)
    outputs: dict[str, Any] = {}
    for tensor, raw in zip(infer.outputs, infer.raw_output_contents):
        if tensor.datatype == "BYTES":
            values, offset = [], 0
            while offset < len(raw):
                (length,) = struct.unpack_from("<I", raw, offset)
                values.append(raw[offset + 4: offset + 4 + length].decode())
                offset += 4 + length
            outputs[tensor.name] = values
        else:
            dtype = {"INT32": np.int32, "UINT32": np.uint32}[tensor.datatype]
            outputs[tensor.name] = np.frombuffer(raw, dtype=dtype).tolist()
    return Response(infer.id, final, outputs=outputs)


# -- processes, from /proc -----------------------------------------------------------------------------
def proc_stat(pid: int) -> tuple[str, int, str] | None:
    """(state, ppid, comm) from /proc/PID/stat, None once the process is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            stat = stat_file.read()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), comm


def descendants(root_pid: int) -> dict[int, str]:
    """{pid: comm} of every process below ``root_pid``."""
    children: dict[int, list[int]] = {}
    comms: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))) is not None:
            children.setdefault(stat[1], []).append(int(entry))
            comms[int(entry)] = stat[2]
    found: dict[int, str] = {}
    todo = [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = comms[child]
            todo.append(child)
    return found


def is_alive(pid: int) -> bool:
    """Running or sleeping: not gone, and not a zombie waiting to be reaped."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""
