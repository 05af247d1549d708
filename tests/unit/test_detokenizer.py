"""The incremental detokenizer against the tokenizer's own decode of the whole output."""
from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from engine.detokenizer import IncrementalDetokenizer, decoder
from tests.helpers import write_tokenizer

DEMO_BASE = "demo/base"


@pytest.fixture(scope="module", params=["byte_bpe", "demo"])
def tokenizer(request, tmp_path_factory):
    if request.param == "demo":
        return AutoTokenizer.from_pretrained(DEMO_BASE)
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(str(path))
    return AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("skip", [True, False])
def test_decoder_equals_the_tokenizers_decode(tokenizer, skip):
    rng = random.Random(0)
    decode = decoder(tokenizer)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(0, 12))]
        assert decode(ids, skip) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_incremental_text_equals_decoding_everything(tokenizer):
    rng = random.Random(1)
    prompt = tokenizer("héllo wörld")["input_ids"]
    for _ in range(10):
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
        out = [rng.randrange(len(tokenizer)) for _ in range(30)]
        text = "".join(detok.add(t) for t in out)
        full = tokenizer.decode(prompt[-6:] + out, skip_special_tokens=True)
        prefix = tokenizer.decode(prompt[-6:], skip_special_tokens=True)
        # text is released when complete: all of it but a possibly unfinished last character
        assert full.startswith(prefix + text)
        assert len(full) - len(prefix + text) <= 1


def test_multibyte_characters_come_out_whole(tokenizer):
    ids = tokenizer("€ and ü", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)  # the demo's vocabulary lacks € and ü
    assert all("\ufffd" not in p for p in pieces)
