"""Test double of ``engine.async_engine.AsyncEngine`` with the same contract, for testing the
Triton glue (model.py) deterministically and without the real engine.

It "generates" the demo tasks one character per token (token id = code point): the base model
echoes the prompt, ``upper``/``reverse``/``rot13`` transform it, then it stops ("stop"); with
``ignore_eos`` it repeats the answer until ``max_tokens`` ("length"). One step every ``step_s``
seconds emits one token for each running request. KV blocks are counted as the real engine does
(``block_size`` tokens per block), so the glue's metrics and cancellation can be checked.

engine.json keys: step_s, max_model_len, max_num_seqs, block_size, num_kv_blocks,
max_waiting_requests, fail_start (start() raises, to test a model that cannot load).
"""
from __future__ import annotations

import codecs
import json
import math
import threading
from dataclasses import dataclass
from typing import Callable

from engine.errors import AdapterNotFoundError, EngineOverloadedError, InvalidRequestError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

TASKS: dict[str, Callable[[str], str]] = {
    "": lambda s: s,
    "upper": str.upper,
    "reverse": lambda s: s[::-1],
    "rot13": lambda s: codecs.encode(s, "rot13"),
}


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks_total: int
    num_kv_blocks_used: int
    num_adapters_loaded: int
    adapter_loads_total: int
    prompt_tokens_total: int
    generation_tokens_total: int


@dataclass
class _Sequence:
    request_id: str
    prompt_len: int
    answer: str
    params: SamplingParams
    on_output: Callable[[RequestOutput], None]
    num_generated: int = 0
    aborted: bool = False


class AsyncEngine:
    def __init__(self, args: dict, adapters: dict[str, str]) -> None:
        self.step_s = float(args.get("step_s", 0.005))
        self.max_model_len = int(args.get("max_model_len", 256))
        self.max_num_seqs = int(args.get("max_num_seqs", 64))
        self.block_size = int(args.get("block_size", 4))
        self.num_kv_blocks = int(args.get("num_kv_blocks", 4096))
        self.max_waiting_requests = int(args.get("max_waiting_requests", 4096))
        self.fail_start = bool(args.get("fail_start", False))
        self.tokenizer = None
        self._known_adapters = set(adapters)
        self._loaded_adapters: set[str] = set()
        self._lock = threading.Lock()
        self._waiting: list[_Sequence] = []
        self._running: list[_Sequence] = []
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)

    @classmethod
    def from_files(cls, engine_json: str, multi_lora_json: str | None,
                   overrides: dict | None) -> "AsyncEngine":
        with open(engine_json) as f:
            args = json.load(f)
        args.update(overrides or {})
        adapters = {}
        if multi_lora_json:
            with open(multi_lora_json) as f:
                adapters = json.load(f)
        return cls(args, adapters)

    def start(self) -> None:
        if self.fail_start:
            raise RuntimeError("fake engine: the base model cannot be loaded (fail_start)")
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            ended, self._running, self._waiting = self._running + self._waiting, [], []
        for seq in ended:
            seq.on_output(self._output(seq, "", finished=True, reason="abort"))

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                    params: SamplingParams, lora_name: str | None,
                    on_output: Callable[[RequestOutput], None]) -> None:
        if prompt is None:
            prompt = "".join(chr(t) for t in prompt_token_ids)
        name = lora_name or ""
        if name not in TASKS or (name and name not in self._known_adapters):
            raise AdapterNotFoundError(
                f"LoRA {name!r} is not loaded; known adapters: {sorted(self._known_adapters)}")
        if len(prompt) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt)} tokens; max_model_len is {self.max_model_len}")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"sampling_parameters: max_tokens={params.max_tokens} plus the prompt's "
                f"{len(prompt)} tokens exceed max_model_len={self.max_model_len}")
        answer = TASKS[name](prompt)
        if params.ignore_eos:
            answer = (answer * (params.max_tokens // max(len(answer), 1) + 1))
        answer = answer[:params.max_tokens]
        with self._lock:
            if len(self._waiting) >= self.max_waiting_requests:
                raise EngineOverloadedError("the waiting queue is full")
            if name:
                self._loaded_adapters.add(name)
            self._waiting.append(_Sequence(request_id, len(prompt), answer, params, on_output))

    def abort(self, request_id: str) -> None:
        with self._lock:
            for seq in self._running + self._waiting:
                if seq.request_id == request_id:
                    seq.aborted = True

    def stats(self) -> EngineStats:
        with self._lock:
            used = sum(math.ceil((s.prompt_len + s.num_generated) / self.block_size)
                       for s in self._running)
            return EngineStats(
                num_running=len(self._running), num_waiting=len(self._waiting),
                num_kv_blocks_total=self.num_kv_blocks, num_kv_blocks_used=used,
                num_adapters_loaded=len(self._loaded_adapters),
                adapter_loads_total=len(self._loaded_adapters),
                prompt_tokens_total=self._prompt_tokens_total,
                generation_tokens_total=self._generation_tokens_total)

    def _loop(self) -> None:
        while not self._stop.wait(self.step_s):
            outputs = []
            with self._lock:
                while self._waiting and len(self._running) < self.max_num_seqs:
                    seq = self._waiting.pop(0)
                    self._running.append(seq)
                    self._prompt_tokens_total += seq.prompt_len
                for seq in list(self._running):
                    if seq.aborted:
                        self._running.remove(seq)
                        outputs.append((seq, self._output(seq, "", True, "abort")))
                        continue
                    char = ""
                    if seq.num_generated < len(seq.answer):
                        char = seq.answer[seq.num_generated]
                        seq.num_generated += 1
                        self._generation_tokens_total += 1
                    done = seq.num_generated >= len(seq.answer)
                    reason = None
                    if done:
                        self._running.remove(seq)
                        reason = "length" if (seq.params.ignore_eos or len(seq.answer) ==
                                              seq.params.max_tokens) else "stop"
                    outputs.append((seq, self._output(seq, char, done, reason)))
                for seq in [s for s in self._waiting if s.aborted]:
                    self._waiting.remove(seq)
                    outputs.append((seq, self._output(seq, "", True, "abort")))
            for seq, output in outputs:
                seq.on_output(output)

    @staticmethod
    def _output(seq: _Sequence, char: str, finished: bool, reason: str | None) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id, text=char, token_ids=[ord(c) for c in char],
            finished=finished, finish_reason=reason, num_prompt_tokens=seq.prompt_len,
            num_output_tokens=seq.num_generated)
