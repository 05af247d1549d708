"""Per-request sampling parameters, validated on construction."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from engine.errors import InvalidRequestError

MAX_LOGPROBS = 20  # most likely tokens returned per position at most (vLLM's default max_logprobs)


@dataclass
class SamplingParams:
    """How to pick tokens for one request (names as in vLLM).

    temperature == 0 means greedy. ``seed`` gives the request its own random generator, so the
    same seed yields the same tokens whatever else shares the batch. ``logprobs=k`` returns the
    log probability of each sampled token and of the k most likely tokens at its position, from
    the model's raw logits (before temperature, top-k and top-p); None returns none.
    """

    max_tokens: int | None = None  # None: the engine's default_max_tokens, clipped to the context
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = -1  # -1 or 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens),
               f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}")
        _check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 0),
               f"top_k must be -1 (off) or an integer >= 0, got {self.top_k!r}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                         and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (the number of most likely tokens returned "
               f"beside each sampled token), got {self.logprobs!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @classmethod
    def from_dict(cls, values: dict[str, Any], ignore: tuple[str, ...] = ()) -> "SamplingParams":
        """Build from a JSON-like dict whose values may be strings (as genai-perf sends them).

        Unknown keys raise InvalidRequestError naming them; keys in ``ignore`` are skipped.
        """
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(k for k in values if k not in known and k not in ignore)
        if unknown:
            raise InvalidRequestError(
                f"sampling_parameters: unknown key(s) {unknown}; known keys: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in ignore:
                continue
            kwargs[key] = _coerce(key, value)
        return cls(**kwargs)


_INT_KEYS = {"max_tokens", "min_tokens", "top_k", "seed", "logprobs"}
_FLOAT_KEYS = {"temperature", "top_p"}
_BOOL_KEYS = {"ignore_eos", "skip_special_tokens"}


def _coerce(key: str, value: Any) -> Any:
    try:
        if value is None:
            return None if key in ("seed", "max_tokens", "logprobs") else _fail(key, value)
        if key in _INT_KEYS:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                _fail(key, value)
            return int(value)
        if key in _FLOAT_KEYS:
            if isinstance(value, bool):
                _fail(key, value)
            return float(value)
        if key in _BOOL_KEYS:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    _fail(key, value)
                return value.lower() in ("true", "1")
            return bool(value)
        if key == "stop":
            if isinstance(value, str):
                value = _maybe_json_list(value)
            return [str(v) for v in value] if isinstance(value, list) else _fail(key, value)
        if key == "stop_token_ids":
            if isinstance(value, str):
                value = _maybe_json_list(value)
            return [int(v) for v in value] if isinstance(value, list) else _fail(key, value)
    except (TypeError, ValueError):
        _fail(key, value)
    return value


def _maybe_json_list(text: str) -> Any:
    if text.startswith("["):
        return json.loads(text)
    return [text]


def _fail(key: str, value: Any) -> Any:
    raise InvalidRequestError(f"sampling_parameters: {key}={value!r} has the wrong type")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequestError(f"sampling_parameters: {message}")
