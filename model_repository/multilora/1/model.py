"""Triton Python-backend model "multilora": glue between Triton requests and the engine process.

The engine runs in a process of its own (engine/core_server.py), started and owned by
``initialize``; the stub keeps a thin client (engine/core_client.py). ``execute`` validates each
request (multilora_requests.py), hands it to the client, which queues it for the engine process
and returns at once, and returns None (decoupled). The client's receiver thread puts each engine
step's outputs on a queue; one response thread drains it, coalesces every delta ready for a
request into one response, hands it to a sender thread (multilora_senders.py; config.pbtxt
parameter ``response_threads``, default 4), polls ``response_sender.is_cancelled()`` and feeds
the metrics (multilora_metrics.py). Every request gets exactly one response flagged FINAL, errors and
cancellation included, and nothing after it.

If the engine process dies (or stops after an internal error), every live request gets a FINAL
INTERNAL error saying so, the cause goes to Triton's log, and the model unloads itself (explicit
model control), so ``/v2/models/multilora/ready`` answers not-ready until it is loaded again.

Engine arguments: ``1/engine.json`` (paths relative to it) and ``1/multi_lora.json`` (adapters
known at start), overridden by the config.pbtxt parameter ``engine_args`` (a JSON object), then by
the environment variable ``MULTILORA_ENGINE_ARGS`` (a JSON object; the launcher's --engine-arg).
"""
from __future__ import annotations

import faulthandler
import itertools
import json
import logging
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from engine.core_admin import admin_address
from engine.core_client import EngineCoreClient
from engine.errors import EngineError, EngineUnavailableError, RequestAbortedError, triton_code, triton_error
from engine.tenants import TENANTS_FILE, TenantRules
from multilora_serve.launcher import ENGINE_ARGS_ENV
from engine.outputs import RequestOutput
from multilora_gateway_metrics import GatewayMetrics
from multilora_metrics import ServingMetrics
from multilora_requests import ParsedRequest, parse_request
from multilora_senders import ResponseSenders

CANCEL_POLL_S = 0.05  # per live request; is_cancelled() is an IPC round trip (~12 to 30 us)
CANCEL_POLL_BUDGET = 0.1  # at most this fraction of the response thread goes to polling
STATS_POLL_S = 0.1
MAX_EVENTS_PER_ROUND = 4096
_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_STOP = ("stop",)
DEFAULT_RESPONSE_THREADS = 4  # config.pbtxt parameter response_threads
FAULTHANDLER_ENV = "MULTILORA_FAULTHANDLER"  # a file: every thread's stack every 30 s, and on a crash

INPUTS = [
    {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "input_ids", "data_type": "TYPE_INT32", "dims": [-1], "optional": True},
    {"name": "lora_name", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "stream", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "sampling_parameters", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "exclude_input_in_output", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "return_finish_reason", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "return_num_input_tokens", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "return_num_output_tokens", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "return_logprobs", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "return_cumulative_logprob", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
]
OUTPUTS = [
    {"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "output_ids", "data_type": "TYPE_INT32", "dims": [-1]},
    {"name": "finish_reason", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "num_input_tokens", "data_type": "TYPE_UINT32", "dims": [1]},
    {"name": "num_output_tokens", "data_type": "TYPE_UINT32", "dims": [-1]},
    {"name": "logprobs", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "cumulative_logprob", "data_type": "TYPE_FP32", "dims": [-1]},
]


def _log(level: str, message: str) -> None:
    getattr(pb_utils.Logger, f"log_{level}")(f"[multilora] {message}")


def _log_engine_line(levelno: int, message: str) -> None:
    """A log line of the engine process, at its level."""
    if levelno >= logging.ERROR:
        _log("error", message)
    elif levelno >= logging.WARNING:
        _log("warn", message)
    elif levelno >= logging.INFO:
        _log("info", message)
    else:
        _log("verbose", message)


def _start_faulthandler() -> None:
    """Diagnosis of a hung or crashed stub: MULTILORA_FAULTHANDLER=/path/file."""
    path = os.environ.get(FAULTHANDLER_ENV)
    if not path:
        return
    stream = open(path, "a", buffering=1)  # kept open for the life of the stub
    faulthandler.enable(file=stream, all_threads=True)
    faulthandler.dump_traceback_later(30, repeat=True, file=stream)
    _log("info", f"faulthandler: stacks to {path} every 30 s")


def _classify(error: BaseException) -> tuple[str, str]:
    """(Triton error code name, metrics reason) of an engine or validation error."""
    return triton_code(error)


@dataclass(eq=False)
class _LiveRequest:
    """A request between execute() and its FINAL response; owned by the response thread."""

    request_id: str
    key: int  # picks the sender thread of all its responses
    request: Any  # kept alive until the FINAL response is sent
    sender: Any
    parsed: ParsedRequest | None  # None: rejected before reaching the engine
    arrival: float
    pending: RequestOutput | None = None  # deltas received but not sent yet
    first_token_seen: bool = False
    first_sent_time: float | None = None  # streaming: the first and last responses with tokens,
    last_sent_time: float | None = None  # and the tokens of the responses after the first
    tokens_after_first: int = 0
    prompt_tokens_counted: bool = False


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config: Any) -> Any:
        config.set_model_transaction_policy({"decoupled": True})
        config.set_max_batch_size(0)
        present = config.as_dict()
        input_names = {i["name"] for i in present.get("input", [])}
        output_names = {o["name"] for o in present.get("output", [])}
        for spec in INPUTS:
            if spec["name"] not in input_names:
                config.add_input(spec)
        for spec in OUTPUTS:
            if spec["name"] not in output_names:
                config.add_output(spec)
        return config

    def initialize(self, args: dict[str, str]) -> None:
        _start_faulthandler()
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise ValueError("multilora needs model_transaction_policy { decoupled: true }")
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        engine_json = os.path.join(version_dir, "engine.json")
        multi_lora_json = os.path.join(version_dir, "multi_lora.json")
        if not os.path.isfile(multi_lora_json):
            multi_lora_json = None
        overrides = _engine_overrides(model_config)
        # tenants.json next to engine.json: every request's token is checked here (engine/tenants.py)
        self._tenants = TenantRules.from_file(os.path.join(version_dir, TENANTS_FILE))
        if self._tenants is not None:
            _log("info", f"tenants: {len(self._tenants.tenants)} from {TENANTS_FILE}; requests need their token")
        try:  # where model multilora_adapters reaches the engine (engine/core_admin.py)
            admin = admin_address(os.getppid(), args["model_name"], create=True)
        except (OSError, RuntimeError) as error:
            _log("warn", f"adapter administration is off: {error}")
            admin = None
        _log("info", f"starting the engine from {engine_json}, adapters {multi_lora_json}, "
                     f"overrides {overrides}")
        self._model_name = args["model_name"]
        self._events: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._metrics = ServingMetrics({"model": args["model_name"],
                                        "version": args["model_version"]}, _log)
        self._gateway_metrics = GatewayMetrics({"model": args["model_name"], "version": args["model_version"]}, _log)
        self._thread = None
        self._senders = ResponseSenders(_response_threads(model_config), _FINAL, _log)
        self._last_stats_error = ""
        self._dead: str | None = None  # set by the response thread when the engine process is gone
        started = time.monotonic()
        self._engine = EngineCoreClient(engine_json, multi_lora_json, overrides,
                                        on_outputs=self._on_step_outputs, on_log=_log_engine_line,
                                        on_death=self._on_engine_death, admin_address=admin)
        try:
            self._engine.start()
        except Exception:
            _log("error", f"the engine could not start:\n{traceback.format_exc()}")
            self._engine.shutdown()
            raise
        self._thread = threading.Thread(target=self._response_loop, name="multilora-responses",
                                        daemon=True)
        self._thread.start()
        _log("info", f"ready in {time.monotonic() - started:.1f} s: engine process {self._engine.pid}, "
                     f"max_model_len={self._engine.max_model_len}")

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._submit(request)
        return None

    def finalize(self) -> None:
        _log("info", "finalize: stopping the engine")
        if self._engine is not None:
            self._engine.shutdown()
        if self._thread is not None:
            self._events.put(_STOP)
            self._thread.join(timeout=60)
            self._thread = None
        self._senders.close()
        self._metrics.close()
        self._gateway_metrics.close()
        _log("info", "finalize: done")

    # -- execute side ----------------------------------------------------------------------
    def _submit(self, request: Any) -> None:
        arrival = time.monotonic()
        key = next(self._ids)
        request_id = str(key)
        try:
            if self._engine.dead is not None:
                raise EngineUnavailableError(
                    f"the engine process {self._engine.dead}; the model is being unloaded: load it again")
            parsed = parse_request(request)
            if self._tenants is not None:  # on every request, also for a resident adapter
                self._tenants.check(parsed.authorization, parsed.lora_name)
        except Exception as error:  # InvalidRequestError, or a bug: the request still gets a FINAL
            live = _LiveRequest(request_id, key, request, request.get_response_sender(), None, arrival)
            self._events.put(("new", live))
            self._events.put(("output", request_id, _failed(request_id, error), arrival))
            return
        live = _LiveRequest(request_id, key, request, request.get_response_sender(), parsed, arrival)
        self._events.put(("new", live))  # before add_request: its outputs may come at once
        try:
            self._engine.add_request(request_id, parsed.prompt, parsed.prompt_token_ids,
                                     parsed.params, parsed.lora_name)
        except Exception as error:
            if isinstance(error, EngineError) and self._engine.dead is not None:
                error = EngineUnavailableError(str(error))
            self._events.put(("output", request_id, _failed(request_id, error), time.monotonic()))

    def _on_step_outputs(self, outputs: list[RequestOutput]) -> None:
        """The client's receiver thread: hand one engine step's outputs over without blocking."""
        self._events.put(("outputs", outputs, time.monotonic()))

    def _on_engine_death(self, message: str) -> None:
        """The client's watcher thread: the engine process is gone."""
        self._events.put(("dead", message))

    # -- response thread -------------------------------------------------------------------
    def _response_loop(self) -> None:
        live: dict[str, _LiveRequest] = {}
        stopping = False
        next_cancel_poll = next_stats = time.monotonic()
        while True:
            timeout = max(0.0, min(next_cancel_poll, next_stats) - time.monotonic())
            events = []
            try:
                events.append(self._events.get(timeout=timeout))
                while len(events) < MAX_EVENTS_PER_ROUND:
                    events.append(self._events.get_nowait())
            except queue.Empty:
                pass
            touched: dict[str, _LiveRequest] = {}
            for event in events:
                if event is _STOP:
                    stopping = True
                elif event[0] == "new":
                    live[event[1].request_id] = event[1]
                elif event[0] == "dead":
                    self._engine_died(event[1], live)
                    touched.clear()
                else:  # ("output", request id, output, time) or ("outputs", [output, ...], time)
                    at = event[-1]
                    for output in (event[1] if event[0] == "outputs" else (event[2],)):
                        state = live.get(output.request_id)
                        if state is not None:  # None: already ended (cancelled)
                            self._take_output(state, output, at)
                            touched[state.request_id] = state
            for state in touched.values():
                try:
                    done = self._flush(state)
                except Exception:  # a bug here must not leave the request without a FINAL
                    _log("error", f"request {state.request_id}: {traceback.format_exc()}")
                    self._send_error(state, "INTERNAL", "internal", "internal error in the model")
                    done = True
                if done:
                    del live[state.request_id]
            now = time.monotonic()
            if now >= next_cancel_poll:
                self._poll_cancelled(live)
                # Keep the IPC cost of polling within its budget when many requests are live.
                interval = max(CANCEL_POLL_S, len(live) * 30e-6 / CANCEL_POLL_BUDGET)
                next_cancel_poll = time.monotonic() + interval
            if now >= next_stats:
                self._update_stats()
                next_stats = now + STATS_POLL_S
            if stopping:
                for state in list(live.values()):
                    self._send_error(state, "UNAVAILABLE", "unavailable",
                                     "the model is being unloaded")
                live.clear()
                self._metrics.flush()
                return

    def _engine_died(self, message: str, live: dict[str, _LiveRequest]) -> None:
        """Every live request ends with INTERNAL; then the model unloads itself (not ready)."""
        _log("error", f"{message}: ending {len(live)} live requests and unloading the model")
        self._dead = message
        for state in live.values():
            self._send_error(state, "INTERNAL", "internal",
                             f"{message}; the model is being unloaded: retry once it is loaded again")
        live.clear()
        threading.Thread(target=self._unload_self, name="multilora-unload", daemon=True).start()

    def _unload_self(self) -> None:
        try:
            pb_utils.unload_model(self._model_name)
        except Exception as error:  # e.g. not in explicit model control mode
            _log("error", f"the model could not unload itself ({error}); it stays loaded without an "
                          "engine and answers UNAVAILABLE: restart the server, or run it with "
                          "--model-control-mode=explicit so that it can be loaded again")

    def _take_output(self, state: _LiveRequest, output: RequestOutput, at: float) -> None:
        if output.num_prompt_tokens and not state.prompt_tokens_counted:
            self._metrics.prompt_tokens(output.num_prompt_tokens)
            state.prompt_tokens_counted = True
        num_tokens = len(output.token_ids)
        if num_tokens:
            self._metrics.generation_tokens(num_tokens)
            if not state.first_token_seen:
                self._metrics.time_to_first_token(at - state.arrival)
                state.first_token_seen = True
        state.pending = output if state.pending is None else state.pending.merge(output)

    def _flush(self, state: _LiveRequest) -> bool:
        """Send what is pending for a request; True once its FINAL response is sent."""
        output = state.pending
        stream = state.parsed is not None and state.parsed.stream
        failed = output.error is not None or (output.finished and output.finish_reason == "abort")
        if stream and (output.text or output.token_ids) and (failed or not output.finished):
            self._note_streamed(state, len(output.token_ids))
            self._send(state, self._response(state, output), 0)
            state.pending = output = RequestOutput(request_id=state.request_id,
                                                   finished=output.finished,
                                                   finish_reason=output.finish_reason,
                                                   error=output.error)
        if failed:
            error = output.error or RequestAbortedError("the request was aborted")
            code, reason = _classify(error)
            self._send_error(state, code, reason, str(error))
            return True
        if output.finished:
            self._metrics.request_succeeded()
            self._metrics.flush()  # counters are current once the client has the FINAL
            if stream:
                self._note_streamed(state, len(output.token_ids))
                if state.tokens_after_first:
                    self._metrics.inter_token_latency(
                        (state.last_sent_time - state.first_sent_time) / state.tokens_after_first)
            self._send(state, self._response(state, output), _FINAL)
            return True
        return False

    def _note_streamed(self, state: _LiveRequest, num_tokens: int) -> None:
        """For the inter-token latency a streaming client sees, observed once per request when it
        ends (each observation is an IPC round trip, about 28 us of the response thread)."""
        if not num_tokens:
            return
        now = time.monotonic()
        if state.first_sent_time is None:
            state.first_sent_time = now
        else:
            state.tokens_after_first += num_tokens
        state.last_sent_time = now

    def _response(self, state: _LiveRequest, output: RequestOutput) -> Any:
        parsed = state.parsed
        values: dict[str, Any] = {}
        if parsed.wants("text_output"):
            text = output.text
            if not parsed.stream and not parsed.exclude_input_in_output and parsed.prompt is not None:
                text = parsed.prompt + text  # as the vLLM backend: the prompt, then the generated text
            values["text_output"] = np.array([text.encode("utf-8")], dtype=np.object_)
        if parsed.wants("output_ids"):
            values["output_ids"] = np.array(output.token_ids, dtype=np.int32)
        if parsed.return_finish_reason and parsed.wants("finish_reason"):
            reason = (output.finish_reason or "") if output.finished else ""
            values["finish_reason"] = np.array([reason.encode()], dtype=np.object_)
        if parsed.return_num_input_tokens and parsed.wants("num_input_tokens"):
            values["num_input_tokens"] = np.array([output.num_prompt_tokens], dtype=np.uint32)
        if parsed.return_num_output_tokens and parsed.wants("num_output_tokens"):  # tokens in this response
            values["num_output_tokens"] = np.array([len(output.token_ids)], dtype=np.uint32)
        if parsed.return_logprobs and parsed.wants("logprobs"):  # the tokens of this response
            values["logprobs"] = np.array([parsed.logprobs_output(output).encode()], dtype=np.object_)
        if parsed.return_cumulative_logprob and parsed.wants("cumulative_logprob"):  # the whole output so far
            values["cumulative_logprob"] = np.array([output.cumulative_logprob or 0.0], dtype=np.float32)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in values.items()])

    def _send_error(self, state: _LiveRequest, code: str, reason: str, message: str) -> None:
        self._metrics.request_failed(reason)
        self._metrics.flush()
        if code == "INTERNAL":
            _log("error", f"request {state.request_id} failed: {message}")
        else:
            _log("verbose", f"request {state.request_id}: {code}: {message}")
        response = pb_utils.InferenceResponse(error=triton_error(pb_utils, message, code))
        self._send(state, response, _FINAL)

    def _send(self, state: _LiveRequest, response: Any, flags: int) -> None:
        self._senders.send(state.key, state, response, flags)

    def _poll_cancelled(self, live: dict[str, _LiveRequest]) -> None:
        for request_id, state in list(live.items()):
            try:
                cancelled = state.sender.is_cancelled()
            except Exception:
                cancelled = False
            if not cancelled:
                continue
            if state.parsed is not None:
                try:
                    self._engine.abort(request_id)
                except Exception as error:
                    _log("warn", f"request {request_id}: abort failed: {error}")
            self._send_error(state, "CANCELLED", "cancelled", "the request was cancelled")
            del live[request_id]

    def _update_stats(self) -> None:
        try:
            stats = self._engine.stats()
            self._metrics.engine_stats(stats)
            self._metrics.flush()
            self._gateway_metrics.update(stats)
        except Exception as error:
            message = f"updating metrics failed: {error!r}"
            if message != self._last_stats_error:  # every STATS_POLL_S: say it once
                _log("warn", message)
                self._last_stats_error = message


def _failed(request_id: str, error: BaseException) -> RequestOutput:
    return RequestOutput(request_id=request_id, finished=True, error=error)


def _response_threads(model_config: dict[str, Any]) -> int:
    text = model_config.get("parameters", {}).get("response_threads", {}).get("string_value")
    try:
        return int(text) if text else DEFAULT_RESPONSE_THREADS
    except ValueError:
        raise ValueError(f"config.pbtxt parameter response_threads must be an integer, got {text!r}") from None


def _engine_overrides(model_config: dict[str, Any]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    parameter = model_config.get("parameters", {}).get("engine_args", {}).get("string_value")
    sources = ((parameter, "config.pbtxt parameter engine_args"),
               (os.environ.get(ENGINE_ARGS_ENV), f"environment variable {ENGINE_ARGS_ENV}"))
    for text, source in sources:
        if not text:
            continue
        try:
            values = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{source} is not valid JSON: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{source} must be a JSON object, got {text!r}")
        overrides.update(values)
    return overrides
