"""What the engine hands back for a request."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """One delta of a streamed request, or (offline API) the whole result.

    A streamed request yields deltas whose ``text``/``token_ids`` are the new part only; the
    last one has ``finished=True`` and a ``finish_reason`` ("stop", "length", "abort"), or
    ``error`` set (an EngineError) when the request failed.

    With ``SamplingParams(logprobs=k)`` each token of ``token_ids`` has one entry in ``logprobs``
    and ``logprob_ranks``, keyed by token id: the sampled token first, then the k most likely
    tokens at that position, most likely first (k + 1 entries, or k when the sampled token is one
    of them). ``token_texts`` has the text of every token id they name, ``cumulative_logprob``
    the sum of the sampled tokens' logprobs over the whole output so far. All four stay None for a
    request that did not ask. Plain types only: outputs cross a process boundary as msgpack.
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # total generated so far, not only in this delta
    prompt_token_ids: list[int] = field(default_factory=list)
    error: Exception | None = None
    logprobs: list[dict[int, float]] | None = None
    logprob_ranks: list[dict[int, int]] | None = None  # 1 = the most likely token of the vocabulary
    token_texts: dict[int, str] | None = None
    cumulative_logprob: float | None = None

    def merge(self, later: "RequestOutput") -> "RequestOutput":
        """Join a later delta of the same request onto this one (coalescing)."""
        return RequestOutput(
            request_id=self.request_id,
            text=self.text + later.text,
            token_ids=self.token_ids + later.token_ids,
            finished=later.finished,
            finish_reason=later.finish_reason,
            num_prompt_tokens=later.num_prompt_tokens or self.num_prompt_tokens,
            num_output_tokens=later.num_output_tokens,
            prompt_token_ids=self.prompt_token_ids or later.prompt_token_ids,
            error=later.error,
            logprobs=_join(self.logprobs, later.logprobs),
            logprob_ranks=_join(self.logprob_ranks, later.logprob_ranks),
            token_texts=None if self.token_texts is None and later.token_texts is None
            else {**(self.token_texts or {}), **(later.token_texts or {})},
            cumulative_logprob=self.cumulative_logprob if later.cumulative_logprob is None
            else later.cumulative_logprob,
        )


def _join(earlier: list | None, later: list | None) -> list | None:
    if earlier is None and later is None:
        return None
    return (earlier or []) + (later or [])
