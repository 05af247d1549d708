"""The engine on its own thread, for the Triton model: add requests, receive deltas, abort."""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from engine.config import EngineConfig
from engine.errors import EngineError, EngineOverloadedError, EngineUnavailableError
from engine.engine_stats import EngineStats
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger("multilora")

OutputCallback = Callable[[RequestOutput], None]
# receives every output of one engine step at once (instead of one callback call per output)
StepSink = Callable[[list[RequestOutput]], None]


class AsyncEngine:
    """Runs LLMEngine's loop on a background thread.

    ``add_request`` validates in the caller's thread (raising EngineError subclasses at once),
    then the loop thread owns the request. ``on_output`` is called from the loop thread with
    each delta and must not block (put it on a queue). A ``step_sink`` set before ``start`` takes
    the outputs of each step as one list instead, in the loop thread (one queue operation per step
    for a consumer that handles many requests); the per-request callbacks then serve only the
    outputs made outside the loop (adapter load failures).
    """

    def __init__(self, config: EngineConfig, adapters: dict[str, str] | None = None) -> None:
        self.config = config
        self.adapters = dict(adapters or {})
        self.engine: LLMEngine | None = None
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._callbacks: dict[str, OutputCallback] = {}
        self._stats = EngineStats()
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self.step_sink: StepSink | None = None
        # where the loop thread's time goes (seconds), logged at shutdown: waiting for work,
        # handling commands, LLMEngine.step, handing outputs over (and stats)
        self.loop_seconds = {"idle": 0.0, "commands": 0.0, "step": 0.0, "outputs": 0.0}
        self.on_fatal: Callable[[str], None] | None = None  # called from the loop thread, once
        self.failed: str | None = None  # why the loop stopped after an internal error
        self._last_stats_error = ""
        self._thread: threading.Thread | None = None
        # adapters read from disk off the request path; request id -> aborted while loading
        self._loader = ThreadPoolExecutor(max_workers=config.adapter_loader_threads,
                                          thread_name_prefix="multilora-adapter-loader")
        self._loading: dict[str, bool] = {}
        self._loading_lock = threading.Lock()

    @classmethod
    def from_files(cls, engine_json: str, multi_lora_json: str | None = None,
                   overrides: dict[str, Any] | None = None) -> "AsyncEngine":
        """engine.json (+ overrides) and a multi_lora.json of {name: path}; relative paths are
        resolved against the directory of the file that holds them."""
        config = EngineConfig.from_json(engine_json, overrides)
        adapters: dict[str, str] = {}
        if multi_lora_json and os.path.isfile(multi_lora_json):
            with open(multi_lora_json) as f:
                raw = json.load(f)
            if not isinstance(raw, dict):
                raise ValueError(f"{multi_lora_json}: expected a JSON object of {{adapter name: path}}")
            base = os.path.dirname(os.path.abspath(multi_lora_json))
            adapters = {name: os.path.normpath(os.path.join(base, path)) for name, path in raw.items()}
        return cls(config, adapters)

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model (raising if it cannot) and start the loop thread."""
        self.engine = LLMEngine(self.config, self.adapters)
        self._publish_stats()
        self._thread = threading.Thread(target=self._loop, name="multilora-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._stop.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=30)
            total = sum(self.loop_seconds.values())
            if total > 0 and self.engine is not None:
                logger.info("engine loop: %d steps in %.1f s; %s", self.engine.stats.steps_total, total,
                            ", ".join(f"{k} {v:.1f} s" for k, v in self.loop_seconds.items()))
        if self.engine is not None:
            self.engine.runner.close()  # tensor-parallel ranks stop

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # --- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                    params: SamplingParams, lora_name: str | None, on_output: OutputCallback) -> None:
        """Validate and tokenize now (raising EngineError subclasses); an adapter that must come
        from disk is read on a loader thread, so neither the caller nor the engine loop waits for
        it. Only the caller's thread tokenizes (an HF tokenizer is not safe across threads)."""
        if self.failed is not None:
            raise EngineError(f"the engine has stopped after an internal error ({self.failed})")
        # The one queue limit of the serving path (the offline API queues everything it is given):
        # waiting in the scheduler, handed over, or waiting for its adapter to load.
        if self.stats().num_waiting + self._commands.qsize() + len(self._loading) >= self.config.max_waiting_requests:
            raise EngineOverloadedError(
                f"{self.config.max_waiting_requests} requests are already waiting (max_waiting_requests); "
                "try again later")
        if lora_name and not self.engine.lora.is_in_host(lora_name):
            self.engine.lora.resolve(lora_name)  # unknown or malformed names fail here, at once
            checked = self.engine.make_sequence(request_id, prompt, prompt_token_ids, params, None)
            with self._loading_lock:
                self._loading[request_id] = False  # True once aborted
            self._loader.submit(self._load_and_add, request_id, checked.prompt_token_ids, checked.params,
                                lora_name, on_output)
            return
        seq = self.engine.make_sequence(request_id, prompt, prompt_token_ids, params, lora_name)
        self._commands.put(("add", (seq, on_output)))

    def abort(self, request_id: str) -> None:
        with self._loading_lock:
            if request_id in self._loading:
                self._loading[request_id] = True
                return
        self._commands.put(("abort", request_id))

    def _load_and_add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      lora_name: str, on_output: OutputCallback) -> None:
        """Loader thread: read the adapter from disk, then hand the request to the loop."""
        try:
            seq = self.engine.make_sequence(request_id, None, prompt_token_ids, params, lora_name)
        except Exception as e:
            with self._loading_lock:
                self._loading.pop(request_id, None)
            if isinstance(e, EngineError):
                error = e
            else:  # the details (paths) go to the log, not to the client
                logger.exception("loading adapter '%s' failed", lora_name)
                error = EngineError(f"loading adapter '{lora_name}' failed: an internal error (see the server's log)")
            on_output(RequestOutput(request_id=request_id, finished=True, finish_reason="error", error=error))
            return
        with self._loading_lock:
            aborted = self._loading.pop(request_id, False)
        if aborted:
            self.engine.release(seq)
            on_output(RequestOutput(request_id=request_id, finished=True, finish_reason="abort",
                                    num_prompt_tokens=seq.num_prompt_tokens))
            return
        self._commands.put(("add", (seq, on_output)))

    def call_in_loop(self, fn: Callable[[LLMEngine], Any], done: Callable[[Any, Exception | None], None]) -> None:
        """Run ``fn(engine)`` on the loop's thread (what reads the pool: adapter administration),
        then ``done(result, error)`` there; a stopped loop answers EngineUnavailableError."""
        self._commands.put(("call", (fn, done)))

    def run_in_background(self, fn: Callable[[], Any], done: Callable[[Any, Exception | None], None]) -> None:
        """Run ``fn()`` on an adapter loader thread (what reads from disk), then ``done(result, error)``."""
        def run() -> None:
            try:
                result = fn()
            except Exception as error:
                if not isinstance(error, EngineError):
                    logger.exception("an adapter action failed")
                    error = EngineError(f"internal error: {type(error).__name__} (see the server's log)")
                done(None, error)
                return
            done(result, None)
        self._loader.submit(run)

    def stats(self) -> EngineStats:
        with self._stats_lock:
            return EngineStats(**vars(self._stats))

    # --- the loop thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        """The whole body is guarded: a failed step, or any other error of the loop, ends every
        live request with an error, records ``failed`` and calls ``on_fatal``; the loop then
        stops (the device state after a failed step cannot be trusted). A failed command fails
        only its request."""
        engine = self.engine
        times = self.loop_seconds
        clock = time.perf_counter
        try:
            while not self._stop.is_set():
                block = not engine.has_work()
                t0 = clock()
                try:
                    command = self._commands.get(block=block, timeout=0.5 if block else None)
                except queue.Empty:
                    command = None
                t1 = clock()
                while command is not None:
                    self._handle(command)
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        command = None
                t2 = clock()
                if engine.has_work():
                    outputs = engine.step()
                    t3 = clock()
                    self._emit(outputs)
                else:
                    t3 = t2
                self._publish_stats()
                t4 = clock()
                times["idle"] += t1 - t0
                times["commands"] += t2 - t1
                times["step"] += t3 - t2
                times["outputs"] += t4 - t3
        except Exception as e:
            logger.exception("the engine loop failed")
            self.failed = f"{type(e).__name__}: {e}"
            self._emit(engine.fail_all(EngineError(f"internal engine error: {self.failed}")))
            self._drain_commands(EngineError(f"internal engine error: {self.failed}"))
            if self.on_fatal is not None:
                self.on_fatal(self.failed)
            return
        self._emit(engine.fail_all(EngineUnavailableError("the engine is shutting down")))
        self._drain_commands(EngineUnavailableError("the engine is shutting down"))

    def _drain_commands(self, error: EngineError) -> None:
        """Fail the requests handed over but not added yet (their adapter references go back)."""
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                seq, callback = arg
                self.engine.release(seq)
                callback(RequestOutput(request_id=seq.request_id, finished=True, finish_reason="error",
                                       error=error))
            elif kind == "call":
                arg[1](None, error)

    def _handle(self, command: tuple[str, Any]) -> None:
        kind, arg = command
        if kind == "add":
            seq, callback = arg
            try:
                self.engine.add(seq)
            except Exception as e:
                if not isinstance(e, EngineError):
                    logger.exception("adding request %s failed", seq.request_id)
                    e = EngineError(f"internal engine error while adding the request: {e}")
                callback(RequestOutput(request_id=seq.request_id, finished=True, finish_reason="error", error=e))
                return
            self._callbacks[seq.request_id] = callback
        elif kind == "abort":
            out = self.engine.abort(arg)
            if out is not None:
                self._emit([out])
        elif kind == "call":
            fn, done = arg
            try:
                result = fn(self.engine)
            except Exception as error:
                if not isinstance(error, EngineError):
                    logger.exception("a call on the engine loop failed")
                    error = EngineError(f"internal error: {type(error).__name__} (see the server's log)")
                done(None, error)
                return
            done(result, None)

    def _emit(self, outputs: list[RequestOutput]) -> None:
        delivered, callbacks = [], []
        for out in outputs:
            callback = (self._callbacks.pop(out.request_id, None) if out.finished
                        else self._callbacks.get(out.request_id))
            if callback is not None:  # None: the request ended already (e.g. aborted)
                delivered.append(out)
                callbacks.append(callback)
        if not delivered:
            return
        if self.step_sink is not None:
            try:
                self.step_sink(delivered)
            except Exception:
                logger.exception("the step sink failed for %d outputs", len(delivered))
            return
        for callback, out in zip(callbacks, delivered):
            try:
                callback(out)
            except Exception:
                logger.exception("output callback failed for request %s", out.request_id)

    def _publish_stats(self) -> None:
        try:
            stats = self.engine.get_stats()
        except Exception as e:  # metrics must not stop the engine; said once per kind of failure
            message = f"reading the engine stats failed: {e!r}"
            if message != self._last_stats_error:
                logger.exception(message)
                self._last_stats_error = message
            return
        with self._stats_lock:
            self._stats = stats
