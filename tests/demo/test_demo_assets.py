"""The embedded demo model (demo/base) and its LoRA adapters (demo/adapters/*), checked with
plain transformers + peft (not the project's engine).  Made by tools/train_demo.py."""

from __future__ import annotations

import json
import os
import string
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from demo.tasks import ADAPTERS, ALPHABET, MAX_LEN, TASKS, heldout_strings, random_strings  # noqa: E402

DEMO = REPO / "demo"
BASE = DEMO / "base"
ADAPTER_DIR = DEMO / "adapters"
PAD, BOS, EOS, SEP = 0, 1, 2, 3
ALLOWED_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
MIN_EXACT = 0.99


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(BASE)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    transformers.utils.logging.disable_progress_bar()
    base = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    m = peft.PeftModel.from_pretrained(base, str(ADAPTER_DIR / ADAPTERS[0]), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        m.load_adapter(str(ADAPTER_DIR / name), adapter_name=name)
    m.eval()
    return m


# ------------------------------------------------------------------------------ files
def test_files_and_size():
    config = json.loads((BASE / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["bos_token_id"] == BOS and config["eos_token_id"] == EOS
    assert config["tie_word_embeddings"] is False
    gen = json.loads((BASE / "generation_config.json").read_text())
    assert gen["bos_token_id"] == BOS and gen["eos_token_id"] == EOS
    assert (BASE / "model.safetensors").is_file()
    for name in ADAPTERS:
        d = ADAPTER_DIR / name
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA"
        assert set(cfg["target_modules"]) <= ALLOWED_MODULES
        assert not cfg.get("modules_to_save")
        assert not cfg.get("use_dora")
        assert cfg.get("bias", "none") == "none"
    assert not list(DEMO.rglob("*.bin")) and not list(DEMO.rglob("*.pt"))
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 10 * 1024 * 1024, total


# ------------------------------------------------------------------------------ tokenizer
def test_tokenizer_prompt_format(tok):
    assert tok.bos_token == "<s>" and tok.bos_token_id == BOS
    assert tok.eos_token == "</s>" and tok.eos_token_id == EOS
    assert tok.pad_token == "<pad>" and tok.pad_token_id == PAD
    assert tok.convert_tokens_to_ids("<sep>") == SEP
    ids = tok("hello")["input_ids"]
    assert ids == [BOS] + tok.convert_tokens_to_ids(list("hello")) + [SEP]
    assert tok("hello", add_special_tokens=False)["input_ids"] == ids[1:-1]


@pytest.mark.parametrize("text", ["hello world", " a  b ", "  ", "x", "HELLO WORLD 42",
                                  "uryyb jbeyq 9", string.printable[:95]])
def test_tokenizer_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) + 2  # one token per character
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    # incremental detokenization: token by token, concatenated
    assert "".join(tok.decode([i], skip_special_tokens=True) for i in ids) == text
    assert "".join(tok.convert_ids_to_tokens(ids[1:-1])) == text


# ------------------------------------------------------------------------------ tasks
def test_tasks():
    assert TASKS["upper"]("ab 1z") == "AB 1Z"
    assert TASKS["reverse"]("ab 1z") == "z1 ba"
    assert TASKS["rot13"]("ab 1z") == "no 1m"
    assert TASKS[""]("ab 1z") == "ab 1z"
    h = heldout_strings()
    assert len(h) == 200 and h == heldout_strings(200, 12345) and h[:10] == heldout_strings(10)
    assert all(1 <= len(s) <= MAX_LEN and set(s) <= set(ALPHABET) for s in h)
    assert random_strings(5, 1) != h[:5]


# ------------------------------------------------------------------------------ behaviour
@torch.no_grad()
def test_greedy_exact_match(model, tok):
    """Every held-out string through the base and each adapter, mixed in one batch."""
    strings = heldout_strings()
    names = ["__base__", *ADAPTERS]
    by_len: dict[int, list[tuple[str, str]]] = {}
    for s in strings:
        for name in names:
            by_len.setdefault(len(s), []).append((s, name))
    ok = {name: 0 for name in names}
    failures = []
    for n, rows in sorted(by_len.items()):
        enc = tok([s for s, _ in rows], return_tensors="pt")  # same length: no padding
        out = model.generate(**enc, adapter_names=[name for _, name in rows], max_new_tokens=n + 2,
                             do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        gen = out[:, enc["input_ids"].shape[1]:].tolist()
        for (s, name), row in zip(rows, gen):
            want = tok(TASKS[name if name != "__base__" else ""](s), add_special_tokens=False)["input_ids"] + [EOS]
            if row[: len(want)] == want:
                ok[name] += 1
            else:
                failures.append((name, s, tok.decode(row)))
    rates = {name: ok[name] / len(strings) for name in names}
    print(rates, failures[:10])
    assert all(r >= MIN_EXACT for r in rates.values()), (rates, failures[:10])


@torch.no_grad()
def test_single_adapter_example(model, tok):
    enc = tok(["hello world"], return_tensors="pt")
    for name, want in [("upper", "HELLO WORLD"), ("reverse", "dlrow olleh"), ("rot13", "uryyb jbeyq")]:
        model.set_adapter(name)
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        assert tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True) == want
    with model.disable_adapter():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    assert tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True) == "hello world"
