"""HF Transformers + PEFT (mixed adapter_names, the S-LoRA paper's baseline) against this engine, in
the same run, on a Llama-7B-shaped fp16 model with random weights: batch 32, prompt 128, 128 new
tokens, greedy, 1/4/16/32 rank-16 q,k,v,o adapters mixed in the batch.

    PYTHONPATH=. python bench/peers.py [--adapters 1,4,16,32] [--json out.json]
"""
from __future__ import annotations

import os
import sys

# Run as a script, Python puts bench/ first on sys.path, where bench/engine.py would shadow the
# `engine` package: put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import tempfile
import time

import torch

from bench.common import LLAMA_7B, QKVO, device_name, random_adapter, write_model_dir
from engine.llm import LLM
from engine.sampling_params import SamplingParams

BATCH, PROMPT, NEW = 32, 128, 128
RANK = 16


def hf_peft(num_adapters_list: list[int]) -> dict[int, float]:
    """tokens/s of HF + PEFT generate with the batch's adapters mixed through adapter_names."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in LLAMA_7B.items() if k != "architectures"})
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.eval()
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=QKVO, lora_dropout=0.0)
    peft = get_peft_model(model, lora, adapter_name="a0")
    for i in range(1, max(num_adapters_list)):
        peft.add_adapter(f"a{i}", lora)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft.eval()
    ids = torch.randint(3, 30000, (BATCH, PROMPT), device="cuda")
    results = {}
    for n in [0] + num_adapters_list:
        names = ["__base__"] * BATCH if n == 0 else [f"a{i % n}" for i in range(BATCH)]
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                      eos_token_id=None, pad_token_id=0, adapter_names=names)
        with torch.no_grad():
            peft.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            peft.generate(ids, **kwargs)
            torch.cuda.synchronize()
        results[n] = BATCH * NEW / (time.perf_counter() - start)
        print(f"HF+PEFT   {n:>3} adapters: {results[n]:8.0f} tokens/s", flush=True)
    del peft, model
    torch.cuda.empty_cache()
    return results


def ours(num_adapters_list: list[int]) -> dict[int, float]:
    llm = LLM(model=write_model_dir(tempfile.mkdtemp()), load_format="dummy", dtype="float16", max_num_seqs=BATCH,
              max_num_batched_tokens=BATCH * PROMPT, gpu_memory_utilization=0.85)
    runner = llm.engine.runner
    for i in range(max(num_adapters_list)):
        llm.engine.lora.register(f"a{i}", random_adapter(f"a{i}", llm.engine.model_config, RANK, QKVO, i,
                                                         runner.page_size, runner.dtype, pin_memory=True))
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 30000, (BATCH, PROMPT), generator=gen).tolist()
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    results = {}
    for n in [0] + num_adapters_list:
        names = [None] * BATCH if n == 0 else [f"a{i % n}" for i in range(BATCH)]
        llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), names[:4])  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, params, lora_names=names)
        torch.cuda.synchronize()
        results[n] = BATCH * NEW / (time.perf_counter() - start)
        print(f"multilora {n:>3} adapters: {results[n]:8.0f} tokens/s", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", default="1,4,16,32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    counts = [int(n) for n in args.adapters.split(",")]
    theirs = hf_peft(counts)
    mine = ours(counts)
    print(f"\n| adapters in the batch | HF+PEFT tokens/s | multilora tokens/s | ratio |\n| --- | ---: | ---: | ---: |")
    for n in [0] + counts:
        label = "none (base model)" if n == 0 else str(n)
        print(f"| {label} | {theirs[n]:.0f} | {mine[n]:.0f} | {mine[n] / theirs[n]:.1f}x |")
    print(f"\ndevice: {device_name()}; batch {BATCH}, prompt {PROMPT}, {NEW} new tokens, rank {RANK} q,k,v,o; "
          f"command: {' '.join(sys.argv)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(), "hf_peft": theirs, "multilora": mine}, f, indent=1)


if __name__ == "__main__":
    main()
