"""Engine-direct decode step time on a Llama-7B-shaped fp16 model with random weights, against
its memory-bandwidth floor: LoRA off, one adapter for the whole batch, and every sequence its own;
each LoRA row's throughput over the LoRA-off row of its batch. Then prefill steps of 2,048 prompt
tokens (16 prompts of 128) with LoRA off, 1 adapter and 16 adapters (rank 16 all-linear): tokens/s
and LoRA-on/LoRA-off, with the LoRA of every projection group as the fused kernel and as the split
pair (shrink + expand), on the Triton kernels.

    PYTHONPATH=. python bench/engine.py [--batches 1,8,32,64,128,256] [--context 256] [--json out.json]
    PYTHONPATH=. python bench/engine.py --tiny   # a 2-layer model on whatever device there is (a smoke run;
    # on a CPU, TRITON_INTERPRET=1 ... --tiny --kernels triton runs the kernels in the interpreter)
"""
from __future__ import annotations

import os
import sys

# Run as a script, Python puts bench/ first on sys.path, where this file would shadow the
# `engine` package: put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import random
import statistics
import tempfile
import time

import torch

from bench.bandwidth import copy_bandwidth
from bench.common import ALL_LINEAR, LLAMA_7B, QKVO, device_name, random_adapter, write_model_dir
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kernels import tiles

MAX_DISTINCT = 64  # distinct adapters in a batch (larger batches reuse them)
PREFILL_PROMPTS = 16  # a prefill step's prompts (each its own adapter in the 16-adapter case)
TINY = {**LLAMA_7B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def weight_bytes(engine: LLMEngine) -> int:
    w = engine.runner.model.w
    return sum(t.numel() * t.element_size() for k, t in w.items() if k != "embed")


def decode_step_time(engine: LLMEngine, batch: int, context: int, lora_names: list[str | None], steps: int) -> tuple[float, int]:
    """Wall time per decode step with ``batch`` sequences at about ``context`` tokens: ``steps``
    consecutive steps, timed together (with async scheduling a step's host work overlaps the
    device's work on the next one, so a step timed alone would hide that), median of 3 runs."""
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=3 * steps + 4 * context, ignore_eos=True)
    ids = []
    for i in range(batch):
        prompt = [1] + [rng.randrange(3, engine.model_config.vocab_size) for _ in range(context - 1)]
        seq = engine.make_sequence(f"b{batch}-{i}-{time.monotonic_ns()}", None, prompt, params, lora_names[i])
        engine.add(seq)
        ids.append(seq.request_id)
    while any(len(engine.seqs[r].output_token_ids) == 0 for r in ids):  # prefill everything
        engine.step()
    ctx_start = sum(engine.seqs[r].num_tokens for r in ids) / batch
    times = []
    for _ in range(3):
        synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        synchronize()
        times.append((time.perf_counter() - start) / steps)
    ctx = round((ctx_start + sum(engine.seqs[r].num_tokens for r in ids) / batch) / 2)  # mean over the timing
    for r in ids:
        engine.abort(r)
    return statistics.median(times), ctx


def prefill_step_time(engine: LLMEngine, num_tokens: int, lora_names: list[str | None], repeats: int) -> float:
    """Wall time of one engine step that prefills ``num_tokens`` prompt tokens of len(lora_names)
    fresh prompts (and samples their first tokens); median of ``repeats`` (after one untimed).
    Without async scheduling, so that the step's tokens are out when it returns."""
    engine.config.async_scheduling = False
    rng = random.Random(1)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    lengths = [num_tokens // len(lora_names) + (i < num_tokens % len(lora_names)) for i in range(len(lora_names))]
    times = []
    for rep in range(repeats + 1):
        ids = []
        for i, (n, name) in enumerate(zip(lengths, lora_names)):
            prompt = [1] + [rng.randrange(3, engine.model_config.vocab_size) for _ in range(n - 1)]
            seq = engine.make_sequence(f"p{num_tokens}-{rep}-{i}-{time.monotonic_ns()}", None, prompt, params, name)
            engine.add(seq)
            ids.append(seq.request_id)
        synchronize()
        start = time.perf_counter()
        steps = 0
        while any(not engine.seqs[r].output_token_ids for r in ids if r in engine.seqs):
            engine.step()
            steps += 1
        synchronize()
        if rep:  # the untimed first one also loads the adapters into the pool
            if steps != 1:
                raise RuntimeError(f"the {num_tokens} prompt tokens took {steps} steps, not one")
            times.append(time.perf_counter() - start)
        while engine.has_work():
            engine.step()
    return statistics.median(times)


def prefill_rows(engine: LLMEngine, adapters: list[str], num_tokens: int, repeats: int) -> list[dict]:
    """LoRA off, 1 adapter, 16 adapters; on the kernels, LoRA both fused and split (tiles.lora_fused)."""
    kernels = ["fused", "split"] if engine.runner.ops.use_kernels else ["reference"]
    cases = [("LoRA off", [None] * PREFILL_PROMPTS), ("1 adapter, rank 16 all-linear", [adapters[0]] * PREFILL_PROMPTS),
             (f"{PREFILL_PROMPTS} adapters, rank 16 all-linear",
              [adapters[i % len(adapters)] for i in range(PREFILL_PROMPTS)])]
    rows, base = [], None
    fused_choice = tiles.lora_fused
    for kernel in kernels:
        tiles.lora_fused = (lambda block_m: False) if kernel == "split" else fused_choice
        try:
            for label, names in cases:
                if label == "LoRA off" and base is not None:
                    continue  # the kernel choice touches LoRA only
                seconds = prefill_step_time(engine, num_tokens, names, repeats)
                if base is None:
                    base = num_tokens / seconds
                tps = num_tokens / seconds
                rows.append({"tokens": num_tokens, "case": label, "step_ms": seconds * 1e3, "tokens_per_s": tps,
                             "lora_kernels": "-" if label == "LoRA off" else kernel, "lora_on_off": tps / base})
                print(f"prefill {num_tokens} | {label:<34} | {rows[-1]['lora_kernels']:<9} | {seconds * 1e3:8.2f} ms | "
                      f"{tps:9.0f} tok/s | {tps / base:5.2f} of LoRA off", flush=True)
        finally:
            tiles.lora_fused = fused_choice
    engine.config.async_scheduling = True
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--prefill-repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model, batches 1,4, context 16, prefill 64 tokens, "
                    "on CUDA if there is one, else on the CPU (a smoke run: the figures mean nothing)")
    ap.add_argument("--kernels", default="auto", help="engine.json kernels: auto, triton (on a CPU with "
                    "TRITON_INTERPRET=1), reference")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.tiny:
        args.batches, args.context, args.steps, args.prefill_tokens, args.prefill_repeats = "1,4", 16, 2, 64, 1
    on_gpu = torch.cuda.is_available()
    # bytes/s of this device, before the pool takes its memory
    bandwidth = copy_bandwidth() if on_gpu else copy_bandwidth("cpu", 1 << 26)
    model_dir = write_model_dir(tempfile.mkdtemp(), TINY if args.tiny else None)
    engine = LLMEngine(EngineConfig(model=model_dir, load_format="dummy",
                                    dtype="float16" if on_gpu else "float32", max_num_seqs=16 if args.tiny else 256,
                                    max_num_batched_tokens=8192, gpu_memory_utilization=0.9,
                                    max_host_adapter_bytes=64 << 30, kernels=args.kernels))
    mc, runner = engine.model_config, engine.runner
    batches = [int(b) for b in args.batches.split(",")]
    setups = {"rank 8 q,k,v,o": (8, QKVO), "rank 16 all-linear": (16, ALL_LINEAR)}
    adapters = {}
    for label, (rank, modules) in setups.items():
        for i in range(min(max(*batches, PREFILL_PROMPTS), MAX_DISTINCT)):  # the prefill rows use 16
            name = f"{label.split()[1]}-{len(modules)}-{i}"
            adapters.setdefault(label, []).append(name)
            engine.lora.register(name, random_adapter(name, mc, rank, modules, i, runner.page_size, runner.dtype,
                                                      pin_memory=torch.cuda.is_available()))
    w_bytes = weight_bytes(engine)
    kv_per_token = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * runner.dtype.itemsize
    rows = []
    for batch in batches:
        lora_off_tps = None
        cases = [("LoRA off", [None] * batch, 0)]
        for label, names in adapters.items():
            one = engine.lora.get(names[0]).num_bytes
            cases.append((f"1 adapter, {label}", [names[0]] * batch, one))
            mixed = [names[i % len(names)] for i in range(batch)]
            if batch > 1:
                    cases.append((f"{len(set(mixed))} adapters, {label}", mixed,
                              sum(engine.lora.get(n).num_bytes for n in set(mixed))))
        for label, names, a_bytes in cases:
            engine.config.async_scheduling = False  # the same step without overlap, for comparison
            sync_seconds, _ = decode_step_time(engine, batch, args.context, names, args.steps)
            engine.config.async_scheduling = True
            seconds, ctx = decode_step_time(engine, batch, args.context, names, args.steps)
            floor = (w_bytes + a_bytes + batch * ctx * kv_per_token) / bandwidth
            tps = batch / seconds
            lora_off_tps = lora_off_tps or tps  # the first case is LoRA off
            rows.append({"batch": batch, "case": label, "step_ms": seconds * 1e3, "sync_step_ms": sync_seconds * 1e3,
                         "floor_ms": floor * 1e3, "frac_of_floor": floor / seconds, "tokens_per_s": tps,
                         "lora_on_off": tps / lora_off_tps})
            print(f"{batch:>5} | {label:<34} | {seconds * 1e3:8.2f} ms (sync {sync_seconds * 1e3:6.2f}) | "
                  f"floor {floor * 1e3:6.2f} ms | {floor / seconds:5.2f} of floor | {tps:9.0f} tok/s | "
                  f"{tps / lora_off_tps:5.2f} of LoRA off", flush=True)
    prefill = prefill_rows(engine, adapters["rank 16 all-linear"], args.prefill_tokens, args.prefill_repeats)
    header = (f"device: {device_name()}; copy bandwidth measured in this run: {bandwidth / 1e12:.2f} TB/s "
              f"(the floor divides by it); command: PYTHONPATH=. python {' '.join(sys.argv)}")
    print(f"\n{header}\n\n| batch | case | step ms | fraction of floor | LoRA-on / LoRA-off throughput |\n"
          f"| ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['batch']} | {r['case']} | {r['step_ms']:.2f} | {r['frac_of_floor']:.2f} | "
              f"{r['lora_on_off']:.2f} |")
    print("\n| prefill tokens | case | LoRA kernels | step ms | tokens/s | LoRA-on / LoRA-off |\n"
          "| ---: | --- | --- | ---: | ---: | ---: |")
    for r in prefill:
        print(f"| {r['tokens']} | {r['case']} | {r['lora_kernels']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['lora_on_off']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(), "copy_bandwidth_bytes_per_s": bandwidth, "command": header,
                       "rows": rows, "prefill_rows": prefill}, f, indent=1)


if __name__ == "__main__":
    main()
