"""What the engine hands back for a request."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """One delta of a streamed request, or (offline API) the whole result.

    A streamed request yields deltas whose ``text``/``token_ids`` are the new part only; the
    last one has ``finished=True`` and a ``finish_reason`` ("stop", "length", "abort"), or
    ``error`` set (an EngineError) when the request failed.
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
        )
