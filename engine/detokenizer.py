"""Incremental detokenization and stop strings."""
from __future__ import annotations

from typing import Callable


def decoder(tokenizer) -> Callable[[list[int], bool], str]:
    """``decode(ids, skip_special_tokens)``: the Rust tokenizer's own decode when the Hugging Face
    wrapper would add nothing to it (no clean-up of tokenization spaces), else the wrapper's.
    The wrapper costs tens of microseconds per call, and the engine decodes every new token."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and not getattr(tokenizer, "clean_up_tokenization_spaces",
                                                                           True):
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


class IncrementalDetokenizer:
    """Text of a growing token list, decoded a few tokens at a time.

    Decodes a window from ``prefix_offset`` so multi-byte characters and tokenizers whose tokens
    change the spacing of their neighbours come out right; text is released only when the last
    character is complete (no trailing U+FFFD).
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self.decode = decoder(tokenizer)
        self.skip = skip_special_tokens
        # start a few tokens into the prompt so the first output token gets its context
        self.tokens = list(prompt_token_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def add(self, token_id: int) -> str:
        """Append a token; return the new text it completes (may be empty)."""
        self.tokens.append(token_id)
        prefix = self.decode(self.tokens[self.prefix_offset:self.read_offset], self.skip)
        full = self.decode(self.tokens[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new_text = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return new_text
        return ""


def find_stop(text: str, stops: list[str], search_from: int) -> int:
    """Index in ``text`` where the earliest stop string starts at or after ``search_from``, or -1."""
    best = -1
    for stop in stops:
        i = text.find(stop, max(0, search_from - len(stop) + 1))
        if i != -1 and (best == -1 or i < best):
            best = i
    return best
