#!/usr/bin/env python3
"""Train the embedded demo model (tiny Llama) and its three LoRA adapters, on CPU.

    .venv/bin/python tools/train_demo.py            # writes demo/base and demo/adapters/*

Deterministic (fixed seeds, deterministic torch algorithms, 2 threads), about 15 minutes
on 2 CPU cores.  Writes:

* ``demo/base/``: a Hugging Face ``LlamaForCausalLM`` checkpoint (float32 safetensors,
  config.json, generation_config.json) with a character-level tokenizer.  The base model
  echoes its input.
* ``demo/adapters/{upper,reverse,rot13}/``: PEFT LoRA adapters (see ``ADAPTERS`` below).

Prompt format, built by the tokenizer itself (``add_special_tokens=True``, the default)::

    "hello"  ->  <s> h e l l o <sep>      the model then generates   H E L L O </s>

Special token ids: <pad>=0, <s>=1 (bos), </s>=2 (eos), <sep>=3, <unk>=4; printable ASCII
(32..126) are ids 5..99, one token per character.

After training, everything is reloaded from disk (AutoModelForCausalLM, AutoTokenizer,
PeftModel) and greedy decoding is checked on ``demo.tasks.heldout_strings()`` (200
strings from seed 12345, never trained on when longer than 3 characters); the script
exits non-zero when any exact-match rate is below 0.99.

``--eval-only`` skips training and just evaluates what is in demo/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from demo.tasks import ADAPTERS as ADAPTER_NAMES  # noqa: E402
from demo.tasks import TASKS, heldout_strings, random_string  # noqa: E402

DEMO = REPO / "demo"
BASE_DIR = DEMO / "base"
ADAPTER_DIR = DEMO / "adapters"

# ---------------------------------------------------------------------------------------
# Tokenizer
SPECIALS = ["<pad>", "<s>", "</s>", "<sep>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, SEP_ID, UNK_ID = range(5)
CHARS = [chr(c) for c in range(32, 127)]  # printable ASCII
PRINTABLE = "".join(CHARS)
VOCAB_SIZE = len(SPECIALS) + len(CHARS)  # 100
MAX_POS = 64

# ---------------------------------------------------------------------------------------
# Model and training plan
MODEL = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POS,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
)
BASE_TRAIN = dict(steps=1000, lr=3e-3, batch=128, warmup=100, weight_decay=0.01, seed=1, printable=0.5)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "upper": dict(r=4, alpha=8, modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  steps=400, lr=3e-3, batch=128, warmup=50, seed=2),
    "reverse": dict(r=16, alpha=32, modules=ATTN + MLP,
                    steps=1200, lr=3e-3, batch=128, warmup=100, seed=3),
    "rot13": dict(r=8, alpha=16, modules=MLP,
                  steps=500, lr=3e-3, batch=128, warmup=50, seed=4),
}
assert set(ADAPTERS) == set(ADAPTER_NAMES)
MIN_EXACT = 0.99


def setup_torch() -> None:
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    random.seed(0)


# ---------------------------------------------------------------------------------------
def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer whose post-processor adds ``<s> ... <sep>`` by itself."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per char
    tok.decoder = decoders.Fuse()  # concatenate, no spaces added or removed
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A <sep>",
        pair="<s> $A <sep> $B:1 </s>:1",
        special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID), ("<sep>", SEP_ID)],
    )
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<sep>"],
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POS,
        padding_side="left",  # decoder-only: batched generate pads on the left
    )
    assert fast("hello")["input_ids"] == [BOS_ID] + [vocab[c] for c in "hello"] + [SEP_ID]
    return fast


def encode_chars(s: str) -> list[int]:
    return [len(SPECIALS) + ord(c) - 32 for c in s]


def make_batch(strings: list[str], task) -> tuple[torch.Tensor, torch.Tensor]:
    """``<s> in <sep> out </s>`` right-padded; labels only on ``out </s>``."""
    rows, labs = [], []
    for s in strings:
        prompt = [BOS_ID] + encode_chars(s) + [SEP_ID]
        target = encode_chars(task(s)) + [EOS_ID]
        rows.append(prompt + target)
        labs.append([-100] * len(prompt) + target)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labs)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(l)] = torch.tensor(l)
    return ids, labels


class StringStream:
    """Endless deterministic random training strings, never a held-out one longer than 3.

    With ``printable`` > 0, that fraction of the strings is drawn over all of printable
    ASCII instead of the demo alphabet (a-z, 0-9, space): the base model is trained to echo
    any printable ASCII, so that every character's embedding and output row is trained --
    without it the upper-case tokens stay untrained and a low-rank ``upper`` adapter cannot
    produce them.
    """

    def __init__(self, seed: int, printable: float = 0.0):
        self.rng = random.Random(seed)
        self.printable = printable
        self.exclude = {s for s in heldout_strings(1000) if len(s) > 3}

    def batch(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            if self.printable and self.rng.random() < self.printable:
                s = random_string(self.rng, alphabet=PRINTABLE)
            else:
                s = random_string(self.rng)
            if s not in self.exclude:
                out.append(s)
        return out


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p)))


def train(model, task, *, steps, lr, batch, warmup, seed, weight_decay=0.0, micro=4, printable=0.0,
          label="") -> float:
    """AdamW, linear warm-up then cosine decay, gradient clipping at 1.0.

    Each step's ``batch`` fresh random strings are sorted by length and split into ``micro``
    micro-batches (less padding, ~30% faster on CPU); the loss is summed over the output
    tokens of all of them and divided by their count, i.e. exactly the full-batch mean.
    """
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    stream = StringStream(seed, printable)
    model.train()
    t0 = time.time()
    avg = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        strings = sorted(stream.batch(batch), key=len)
        per = math.ceil(batch / micro)
        parts = [make_batch(strings[i : i + per], task) for i in range(0, batch, per)]
        n_target = sum(int((labels != -100).sum()) for _, labels in parts)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for ids, labels in parts:
            logits = model(input_ids=ids).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum") / n_target
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        avg = total if avg is None else 0.95 * avg + 0.05 * total
        if step % 100 == 0 or step == steps - 1:
            print(f"[{label}] step {step:5d}/{steps} loss {avg:.5f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{time.time() - t0:6.1f}s", flush=True)
    model.eval()
    return time.time() - t0


# ---------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_exact(model, tokenizer, strings: list[str], task) -> tuple[float, list]:
    """Greedy ``generate`` grouped by length (so no padding); exact match incl. the EOS."""
    by_len: dict[int, list[str]] = {}
    for s in strings:
        by_len.setdefault(len(s), []).append(s)
    ok, failures = 0, []
    for n, group in sorted(by_len.items()):
        enc = tokenizer(group, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=n + 2, do_sample=False,
                             eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        for s, row in zip(group, out[:, enc["input_ids"].shape[1]:].tolist()):
            want = encode_chars(task(s)) + [EOS_ID]
            if row[: len(want)] == want:
                ok += 1
            else:
                failures.append((s, tokenizer.decode(row)))
    return ok / len(strings), failures


def evaluate(n: int = 200) -> dict[str, float]:
    tok = AutoTokenizer.from_pretrained(BASE_DIR)
    base = AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32)
    base.eval()
    strings = heldout_strings(n)
    rates = {}
    rate, fails = greedy_exact(base, tok, strings, TASKS[""])
    rates["(base)"] = rate
    print(f"exact match  (base)   {rate:.4f}  {fails[:3]}", flush=True)
    present = [n for n in ADAPTER_NAMES if (ADAPTER_DIR / n / "adapter_config.json").is_file()]
    for name in ADAPTER_NAMES:
        if name not in present:
            rates[name] = 0.0
            print(f"exact match  {name:8s} MISSING ({ADAPTER_DIR / name})", flush=True)
    if not present:
        return rates
    model = PeftModel.from_pretrained(base, str(ADAPTER_DIR / present[0]), adapter_name=present[0])
    for name in present[1:]:
        model.load_adapter(str(ADAPTER_DIR / name), adapter_name=name)
    model.eval()
    for name in present:
        model.set_adapter(name)
        rate, fails = greedy_exact(model, tok, strings, TASKS[name])
        rates[name] = rate
        print(f"exact match  {name:8s} {rate:.4f}  {fails[:3]}", flush=True)
    return rates


def tidy_adapter_dir(out: Path) -> None:
    """Byte-stable, path-independent adapter_config.json; drop peft's empty model card."""
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "demo/base"
    cfg["target_modules"] = sorted(cfg["target_modules"])  # peft writes a set: random order
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "README.md").unlink(missing_ok=True)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-only", action="store_true", help="evaluate demo/ as it is")
    ap.add_argument("--only", choices=["base", *ADAPTER_NAMES], action="append",
                    help="train only these parts (others are left as they are on disk)")
    args = ap.parse_args()
    setup_torch()
    t_start = time.time()
    times = {}

    if not args.eval_only:
        parts = args.only or ["base", *ADAPTER_NAMES]
        if "base" in parts:
            tokenizer = build_tokenizer()
            torch.manual_seed(0)
            config = LlamaConfig(**MODEL, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
            model = LlamaForCausalLM(config).float()
            nparams = sum(p.numel() for p in model.parameters())
            print(f"base: {nparams / 1e6:.3f}M parameters, {MODEL}", flush=True)
            times["base"] = train(model, TASKS[""], label="base", **BASE_TRAIN)
            if BASE_DIR.exists():
                shutil.rmtree(BASE_DIR)
            model.config.architectures = ["LlamaForCausalLM"]
            model.generation_config = GenerationConfig(
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                do_sample=False, max_new_tokens=MAX_POS // 2,
            )
            model.save_pretrained(BASE_DIR, safe_serialization=True)
            tokenizer.save_pretrained(BASE_DIR)
        for name in ADAPTER_NAMES:
            if name not in parts:
                continue
            spec = ADAPTERS[name]
            torch.manual_seed(spec["seed"])
            base = AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32)
            lcfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=spec["modules"],
                              lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
            model = get_peft_model(base, lcfg)
            model.print_trainable_parameters()
            times[name] = train(model, TASKS[name], label=name, steps=spec["steps"], lr=spec["lr"],
                                batch=spec["batch"], warmup=spec["warmup"], seed=spec["seed"])
            out = ADAPTER_DIR / name
            if out.exists():
                shutil.rmtree(out)
            model.save_pretrained(out, safe_serialization=True)
            tidy_adapter_dir(out)
        print(f"training times (s): { {k: round(v, 1) for k, v in times.items()} }", flush=True)

    rates = evaluate()
    size = dir_size(DEMO)
    print(json.dumps({"exact_match": rates, "train_seconds": {k: round(v, 1) for k, v in times.items()},
                      "total_seconds": round(time.time() - t_start, 1), "demo_bytes": size}), flush=True)
    bad = [k for k, v in rates.items() if v < MIN_EXACT]
    if bad:
        print(f"FAIL: exact match below {MIN_EXACT} for {bad}", file=sys.stderr)
        return 1
    if size >= 10 * 1024 * 1024:
        print(f"FAIL: demo/ is {size} bytes (>= 10 MiB)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
