"""Per-request sampling parameters, validated on construction."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

from engine.errors import InvalidRequestError
from engine.request_checks import MAX_INT_DIGITS, parse_json

MAX_LOGPROBS = 20  # most likely tokens returned per position at most (vLLM's default max_logprobs)
# Below it a temperature is greedy (vLLM's _SAMPLING_EPS): logits / 1e-39 overflow float32 to
# Inf, and softmax of Inf is NaN, which samples token 0.
MIN_TEMPERATURE = 1e-5
# Seeds are in [0, 2^63), a non-negative signed 64-bit integer: torch.Generator.manual_seed
# overflows from 2^64 (an INTERNAL error once) and folds negative seeds onto large ones.
MAX_SEED = 1 << 63
# Token counts and ids are below 2^31: beyond any context or vocabulary, and they must cross the
# wire to the engine process (msgpack) and index tensors without overflowing.
MAX_INT = (1 << 31) - 1
# Stop strings are searched for in the new text of every token (find_stop), and the longest one,
# less a character, is held back from every streamed response: both costs grow with them. 16
# strings (OpenAI's API takes 4) of at most 1024 characters each bound the work per token.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
# stop_token_ids are compared with every sampled token and masked in the logits until min_tokens
# are out: 1024 ids bound that per-step work (a vocabulary's special tokens number fewer).
MAX_STOP_TOKEN_IDS = 1024


@dataclass
class SamplingParams:
    """How to pick tokens for one request (names as in vLLM).

    temperature == 0 means greedy, and so does any temperature below ``MIN_TEMPERATURE`` (1e-5,
    as vLLM): dividing logits by a smaller one overflows. ``seed`` (an integer in [0, 2^63)) gives
    the request its own random generator, so the same seed yields the same tokens whatever else
    shares the batch. ``logprobs=k`` returns the log probability of each sampled token and of the
    k most likely tokens at its position, from the model's raw logits (before temperature, top-k
    and top-p); None returns none. At most ``MAX_STOP_STRINGS`` stop strings of at most
    ``MAX_STOP_STRING_CHARS`` characters each, and ``MAX_STOP_TOKEN_IDS`` stop token ids.
    Every value is checked here, so a request that passes cannot fail later for its parameters;
    what depends on the model (max_tokens against the context, stop_token_ids against the
    vocabulary) is checked by ``LLMEngine.make_sequence``.
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
        _check(isinstance(self.stop, (list, tuple)) or self.stop is None, "stop must be a string or a list of strings")
        self.stop = list(self.stop or [])
        _check(isinstance(self.stop_token_ids, (list, tuple)) or self.stop_token_ids is None,
               "stop_token_ids must be a list of integers")
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(self.max_tokens is None or _is_int_in(self.max_tokens, 1, MAX_INT),
               f"max_tokens must be an integer in [1, {MAX_INT}], got {_shown(self.max_tokens)}")
        _check(_is_int_in(self.min_tokens, 0, self.max_tokens or MAX_INT),
               "min_tokens must be an integer in "
               + (f"[0, max_tokens={self.max_tokens}]" if self.max_tokens else f"[0, {MAX_INT}]")
               + f", got {_shown(self.min_tokens)}")
        _check(_is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0, got {_shown(self.temperature)}")
        _check(_is_int_in(self.top_k, -1, MAX_INT),
               f"top_k must be -1 or 0 (off) or an integer in [1, {MAX_INT}], got {_shown(self.top_k)}")
        _check(_is_real(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {_shown(self.top_p)}")
        _check(self.seed is None or _is_int_in(self.seed, 0, MAX_SEED - 1),
               f"seed must be an integer in [0, 2^63), got {_shown(self.seed)}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings")
        _check(len(self.stop) <= MAX_STOP_STRINGS,
               f"stop holds {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        _check(all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
               f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters each, got one of "
               f"{max((len(s) for s in self.stop), default=0)}")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
               f"stop_token_ids holds {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed")
        bad_ids = [t for t in self.stop_token_ids if not _is_int_in(t, 0, MAX_INT)]
        _check(not bad_ids, f"stop_token_ids must be integers in [0, {MAX_INT}], got {_shown(bad_ids[:5])}")
        _check(self.logprobs is None or _is_int_in(self.logprobs, 0, MAX_LOGPROBS),
               f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (the number of most likely tokens returned "
               f"beside each sampled token), got {_shown(self.logprobs)}")
        # plain Python numbers from here on (numpy integers pass the checks; the wire wants ints)
        for name in ("max_tokens", "min_tokens", "top_k", "seed", "logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

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
            return _coerce_int(key, value)
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
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidRequestError(f"sampling_parameters: stop must be a string or a list of strings, "
                                          f"got {_shown(value)}")
            return list(value)
        if key == "stop_token_ids":
            if isinstance(value, str):
                value = _maybe_json_list(value)
            return [_coerce_int(key, v) for v in value] if isinstance(value, list) else _fail(key, value)
    except InvalidRequestError:
        raise
    except (TypeError, ValueError, OverflowError):
        _fail(key, value)
    return value


def _coerce_int(key: str, value: Any) -> int:
    """An int from an int, an integral float or a string of an integer; never from a bool."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        _fail(key, value)
    return int(value)


def _maybe_json_list(text: str) -> Any:
    if text.startswith("["):
        return parse_json(text, "sampling_parameters")
    return [text]


def _fail(key: str, value: Any) -> Any:
    raise InvalidRequestError(f"sampling_parameters: {key}={_shown(value)} has the wrong type")


def _shown(value: Any, limit: int = 100) -> str:
    """repr for a message, cut to ``limit`` characters (repr of an int of more than 4300 digits
    raises ValueError)."""
    if isinstance(value, int) and abs(value) >= 10 ** MAX_INT_DIGITS:
        return f"an integer of more than {MAX_INT_DIGITS} digits"
    try:
        text = repr(value)
    except ValueError:
        return f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= high


def _is_real(value: Any) -> bool:
    # NaN passes this; the range checks after it refuse NaN, which compares false with everything
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequestError(f"sampling_parameters: {message}")
