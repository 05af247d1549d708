"""Offline API, as vLLM users know it: LLM(...).generate(prompts, sampling_params, lora_names)."""
from __future__ import annotations

from typing import Any, Sequence as Seq

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class LLM:
    """Generate for a list of prompts, each with its own adapter, in one continuous batch.

    >>> llm = LLM(model="demo/base", adapters={"upper": "demo/adapters/upper"})
    >>> out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=16), lora_names=["upper"])
    >>> out[0].text
    'HELLO'
    """

    def __init__(self, model: str, adapters: dict[str, str] | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args), adapters)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | Seq[str] | Seq[list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 lora_names: str | None | Seq[str | None] = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the order of the prompts.

        prompts: texts, or lists of token ids. sampling_params and lora_names: one for all
        prompts or one per prompt; a lora name of None or "" means the base model.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), n, "sampling_params")
        names = _per_prompt(lora_names, n, "lora_names")
        results: dict[str, RequestOutput] = {}
        for i, (prompt, p, name) in enumerate(zip(prompts, params, names)):
            text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
            seq = self.engine.make_sequence(f"offline-{i}", text, ids, p, name)
            self.engine.add(seq)
            results[seq.request_id] = RequestOutput(request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids)
        while self.engine.has_work():
            for delta in self.engine.step():
                results[delta.request_id] = results[delta.request_id].merge(delta)
        return [results[f"offline-{i}"] for i in range(n)]


def _per_prompt(value: Any, n: int, what: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what}: {len(value)} given for {n} prompts")
        return list(value)
    return [value] * n
