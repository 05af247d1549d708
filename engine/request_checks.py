"""The rules a request must follow that both the Triton model (in the stub, which imports no torch)
and the engine (for its own API users) apply: one place for each rule and its message."""
from __future__ import annotations

import json
from typing import Any

from engine.errors import InvalidRequestError


def check_adapter_name(name: str, source: str = "lora_name") -> None:
    """A plain name: no path separators, no '..', no leading dot, no spaces or control
    characters. Names are ids, never paths."""
    if (not name or "/" in name or "\\" in name or ".." in name or name.startswith(".")
            or any(ch.isspace() or ord(ch) < 32 for ch in name)):
        raise InvalidRequestError(
            f"lora_name {name!r} (from {source}) is not a plain adapter name: it must not contain path "
            "separators, '..', a leading dot, spaces or control characters")


def check_prompt(prompt: str | None, prompt_token_ids: list[int] | None) -> None:
    """Exactly one of the text and the token ids."""
    if (prompt is None) == (prompt_token_ids is None):
        raise InvalidRequestError(
            "exactly one of the inputs text_input and input_ids is required, got "
            + ("both" if prompt is not None else "neither"))


def parse_json(text: str, what: str) -> Any:
    """json.loads, every failure an InvalidRequestError naming ``what``: text that is not JSON,
    and JSON nested deeper than the parser's recursion limit (json.loads raises RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidRequestError(f"{what}: nested too deeply") from None
    except ValueError as error:
        raise InvalidRequestError(f"{what} is not valid JSON ({error})") from error
