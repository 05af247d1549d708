"""Where a step's GPU time goes, kernel by kernel and stream by stream: torch.profiler traces of
decode steps as the engine runs them (CUDA graphs, async scheduling) and of prefill steps.

    PYTHONPATH=. python tools/trace_step.py [--cases b32:off,b64:r16all:64,...] [--out DIR]

A case is ``b<batch>:<lora>[:<adapters>]`` (lora: off, r8qkvo, r16all; adapters: distinct ones,
default the batch) or ``p<tokens>:<lora>:<adapters>[:inplace]`` for one prefill step (the LoRA
added into the GEMM's output in place, instead of by the base GEMM). Each case writes its Chrome
trace (DIR/trace_<case>.json.gz) and prints a line per kernel class: time summed over the kernels
of a step, and the step's GPU span, with how much of it each stream was busy.
"""
from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import collections
import gzip
import json
import random
import tempfile
import time

import torch

from bench.common import ALL_LINEAR, QKVO, random_adapter, write_model_dir
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

LORA = {"off": None, "r8qkvo": (8, QKVO), "r16all": (16, ALL_LINEAR)}
CLASSES = (("lora_shrink", "shrink"), ("lora_expand", "expand"), ("lora_fused", "fused"),
           ("attention", "attention"), ("rms_norm", "elementwise"), ("rotary", "elementwise"),
           ("silu", "elementwise"), ("memset", "memset"), ("Memset", "memset"), ("gemm", "gemm"), ("nvjet", "gemm"),
           ("xmma", "gemm"), ("cutlass", "gemm"), ("Memcpy", "memcpy"))


def kernel_class(name: str) -> str:
    for needle, cls in CLASSES:
        if needle in name:
            return cls
    return "other"


def summarize(trace_path: str, steps: int) -> dict:
    """Per step: summed kernel time by class, the GPU span (first kernel start to last end) and
    each stream's busy time (union of its kernels' intervals)."""
    with gzip.open(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e]
    if not kernels:
        return {"error": "no kernel events in the trace"}
    by_class = collections.Counter()
    for e in kernels:
        by_class[kernel_class(e["name"]) if e["cat"] == "kernel" else e["cat"]] += e["dur"]
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    busy = {}
    for stream in {e["args"].get("stream") for e in kernels}:
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels if e["args"].get("stream") == stream)
        total, cur_s, cur_e = 0.0, None, None
        for s, t in spans:
            if cur_e is None or s > cur_e:
                total += 0 if cur_e is None else cur_e - cur_s
                cur_s, cur_e = s, t
            else:
                cur_e = max(cur_e, t)
        busy[str(stream)] = (total + (cur_e - cur_s)) / steps
    return {"span_us": (end - start) / steps, "kernels": len(kernels) / steps,
            "by_class_us": {k: v / steps for k, v in by_class.most_common()}, "stream_busy_us": busy}


def profile(fn, path: str) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    raw = path[:-3]
    prof.export_chrome_trace(raw)
    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        dst.write(src.read())
    os.remove(raw)


def adapters_for(engine: LLMEngine, lora: str, count: int, cache: dict) -> list[str]:
    rank, modules = LORA[lora]
    names = []
    for i in range(count):
        name = f"{lora}-{i}"
        if name not in cache:
            engine.lora.register(name, random_adapter(name, engine.model_config, rank, modules, i,
                                                      engine.runner.page_size, engine.runner.dtype, pin_memory=True))
            cache[name] = True
        names.append(name)
    return names


def run_decode(engine: LLMEngine, batch: int, names: list, steps: int, path: str) -> None:
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    ids = []
    for i in range(batch):
        prompt = [1] + [rng.randrange(3, engine.model_config.vocab_size) for _ in range(255)]
        seq = engine.make_sequence(f"t{batch}-{i}-{time.monotonic_ns()}", None, prompt, params, names[i % len(names)])
        engine.add(seq)
        ids.append(seq.request_id)
    while any(len(engine.seqs[r].output_token_ids) == 0 for r in ids):
        engine.step()
    for _ in range(6):  # graph capture of the bucket, then steady steps
        engine.step()
    torch.cuda.synchronize()

    def steps_fn():
        for _ in range(steps):
            engine.step()
    profile(steps_fn, path)
    for r in ids:
        engine.abort(r)
    while engine.has_work():
        engine.step()


def run_prefill(engine: LLMEngine, tokens: int, names: list, path: str) -> None:
    rng = random.Random(1)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    engine.config.async_scheduling = False

    def one_step(tag):
        ids = []
        for i, name in enumerate(names):
            n = tokens // len(names)
            prompt = [1] + [rng.randrange(3, engine.model_config.vocab_size) for _ in range(n - 1)]
            seq = engine.make_sequence(f"p{tag}-{i}-{time.monotonic_ns()}", None, prompt, params, name)
            engine.add(seq)
            ids.append(seq.request_id)
        torch.cuda.synchronize()
        while engine.has_work():
            engine.step()
    one_step("warm")
    profile(lambda: one_step("timed"), path)
    engine.config.async_scheduling = True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="b32:off,b64:off,b64:r8qkvo:64,b64:r16all:64,b1:r16all,"
                                       "p2048:r16all:16,p2048:r16all:16:inplace,p2048:off")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=write_model_dir(tempfile.mkdtemp()), load_format="dummy", dtype="float16",
                                    max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.9,
                                    max_host_adapter_bytes=64 << 30, warmup=False))
    registered: dict = {}
    report = {}
    for case in args.cases.split(","):
        parts = case.split(":")
        lora = parts[1]
        path = os.path.join(args.out, f"trace_{case.replace(':', '_')}.json.gz")
        ops = engine.runner.ops
        if parts[0].startswith("b"):
            batch = int(parts[0][1:])
            count = int(parts[2]) if len(parts) > 2 else batch
            names = [None] if lora == "off" else adapters_for(engine, lora, count, registered)
            run_decode(engine, batch, names, args.steps, path)
            steps = args.steps
        else:
            tokens, count = int(parts[0][1:]), int(parts[2]) if len(parts) > 2 else 16
            names = [None] * 16 if lora == "off" else adapters_for(engine, lora, count, registered)
            names = [names[i % len(names)] for i in range(16)]
            ops.lora_into_gemm = not (len(parts) > 3 and parts[3] == "inplace")
            run_prefill(engine, tokens, names, path)
            ops.lora_into_gemm = True
            steps = 1
        report[case] = summarize(path, steps)
        r = report[case]
        print(f"{case}: span {r.get('span_us', 0):.0f} us/step, {r.get('kernels', 0):.0f} kernels/step, "
              f"streams busy {({k: round(v) for k, v in r.get('stream_busy_us', {}).items()})}", flush=True)
        for cls, us in r.get("by_class_us", {}).items():
            print(f"    {cls:<12} {us:9.0f} us/step", flush=True)
    with open(os.path.join(args.out, "trace_summary.json"), "w") as f:
        json.dump(report, f, indent=1)
    engine.runner.close()


if __name__ == "__main__":
    main()
