"""The rules a request must follow that both the Triton model (in the stub, which imports no torch)
and the engine (for its own API users) apply: one place for each rule and its message."""
from __future__ import annotations

import json
from typing import Any

from engine.errors import InvalidRequestError


MAX_ADAPTER_NAME_BYTES = 255  # an adapter is found as a folder of that name: a file-name limit


def check_adapter_name(name: str, source: str = "lora_name") -> None:
    """A plain name of at most MAX_ADAPTER_NAME_BYTES bytes: no path separators, no '..', no
    leading dot, no spaces or control characters. Names are ids, never paths."""
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_ADAPTER_NAME_BYTES:
        raise InvalidRequestError(
            f"lora_name {name[:32]!r}... (from {source}) is {size} bytes long; an adapter name has at most "
            f"{MAX_ADAPTER_NAME_BYTES} bytes (it is a folder name)")
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


# A prompt of more bytes than max_model_len * MAX_PROMPT_BYTES_PER_TOKEN is refused before it is
# tokenized (tokenizing costs about a second of CPU per MiB, in the request path). Natural text
# and code take 3 to 5 bytes a token in Llama, Mistral and Qwen vocabularies (the demo's byte
# tokenizer: 1); a prompt that fits the context at more than 32 bytes a token can only be text
# made of the few long tokens a vocabulary holds (runs of spaces or dashes).
MAX_PROMPT_BYTES_PER_TOKEN = 32


def check_prompt_size(prompt: str, max_model_len: int) -> None:
    """Refuse a prompt too long for the context by its size alone, before tokenizing it: a
    check of microseconds, whatever its length."""
    max_bytes = max_model_len * MAX_PROMPT_BYTES_PER_TOKEN
    # a character is 1 to 4 bytes in UTF-8: only between the bounds are the bytes counted (a copy)
    if len(prompt) > max_bytes or (len(prompt) * 4 > max_bytes
                                   and len(prompt.encode("utf-8", "surrogatepass")) > max_bytes):
        raise InvalidRequestError(
            f"text_input: the prompt is more than {max_bytes} bytes, more than a prompt that fits the context can "
            f"be ({MAX_PROMPT_BYTES_PER_TOKEN} bytes per token of max_model_len={max_model_len})")


# Python refuses to turn more decimal digits than this into an int (sys.get_int_max_str_digits;
# the conversion is quadratic); json.loads would fail on such a number with a message naming no key.
MAX_INT_DIGITS = 4300


def _parse_int(digits: str) -> int:
    """An integer of JSON; one of more than MAX_INT_DIGITS digits becomes +-10**MAX_INT_DIGITS,
    beyond every limit, so the check of the field that holds it names the field."""
    if len(digits.lstrip("-")) <= MAX_INT_DIGITS:
        return int(digits)
    return -10 ** MAX_INT_DIGITS if digits.startswith("-") else 10 ** MAX_INT_DIGITS


def parse_json(text: str, what: str) -> Any:
    """json.loads, every failure an InvalidRequestError naming ``what``: text that is not JSON,
    and JSON nested deeper than the parser's recursion limit (json.loads raises RecursionError).
    Integers too long for Python's int parsing come back beyond every limit (``_parse_int``)."""
    try:
        return json.loads(text, parse_int=_parse_int)
    except RecursionError:
        raise InvalidRequestError(f"{what}: nested too deeply") from None
    except ValueError as error:
        raise InvalidRequestError(f"{what} is not valid JSON ({error})") from error
