"""One request's state inside the engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_name: str | None = None
    lora: Any = None  # PackedAdapter held for this request (host tier), None for the base model
    lora_released: bool = False
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    # tokens sampled by a launched step that have not reached the host yet (async scheduling), and
    # the row of the latest one in that step's sampled tokens on the device
    num_pending: int = 0
    pending_row: int = -1
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    # text already handed out, and where the next delta starts
    output_text: str = ""
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    detokenizer: Any = None
    # params.logprobs set: per output token, {token id: logprob} and {token id: rank} of the sampled
    # token and the k most likely; the text of the token ids seen there; the sampled tokens' sum
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    output_logprob_ranks: list[dict[int, int]] = field(default_factory=list)
    token_texts: dict[int, str] = field(default_factory=dict)
    cumulative_logprob: float = 0.0

    @property
    def all_token_ids(self) -> list[int]:
        """The tokens known on the host (pending ones excluded)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, pending ones included: what the scheduler plans with."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) + self.num_pending

    @property
    def last_token_pending(self) -> bool:
        """Its final token (max_tokens) is already in flight: nothing is left to compute."""
        return self.num_pending > 0 and self.params.max_tokens is not None \
            and self.num_output_tokens >= self.params.max_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED
