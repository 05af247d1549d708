"""Engine-direct decode step time on a Llama-shaped fp16 model with random weights, against
its memory-bandwidth floor: LoRA off, one adapter for the whole batch, and every sequence its own.

    PYTHONPATH=. python bench/engine.py [--batches 1,8,32,64,128,256] [--context 256] [--json out.json]
        [--shape 7b|13b|70b|tiny] [--tensor-parallel-size N] [--fully-sharded-loras] [--max-distinct 64]

With ``--tensor-parallel-size N`` the engine runs on N GPUs (load_format dummy: each rank makes
its own shard's random weights); the floor is then one GPU's: its shard of the weights, of the
adapters and of the KV cache, over the copy bandwidth of one GPU. ``--shape tiny`` runs on a CPU
in seconds (gloo), to prove the harness.
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
from bench.common import ALL_LINEAR, QKVO, SHAPES, device_name, random_adapter, write_model_dir
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams



def weight_bytes(engine: LLMEngine) -> int:
    """Bytes a decode step reads of the weights (rank 0's shard under tensor parallelism)."""
    w = engine.runner.model.w
    return sum(t.numel() * t.element_size() for k, t in w.items() if k != "embed")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--json", default=None)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--max-distinct", type=int, default=64,
                    help="distinct adapters in a batch (larger batches reuse them; fewer make a 70B run start sooner)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--fully-sharded-loras", action="store_true", help="S-LoRA's sharding (mode 2)")
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    # bytes/s of one device, before the pool takes its memory
    bandwidth = copy_bandwidth("cuda" if on_gpu else "cpu", (1 << 30) if on_gpu else (64 << 20))
    model_dir = write_model_dir(tempfile.mkdtemp(), SHAPES[args.shape])
    size = args.tensor_parallel_size
    engine = LLMEngine(EngineConfig(model=model_dir, load_format="dummy", dtype="float16" if on_gpu else "float32",
                                    max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.9,
                                    max_host_adapter_bytes=64 << 30, tensor_parallel_size=size,
                                    fully_sharded_loras=args.fully_sharded_loras))
    mc, runner = engine.model_config, engine.runner
    batches = [int(b) for b in args.batches.split(",")]
    setups = {"rank 8 q,k,v,o": (8, QKVO), "rank 16 all-linear": (16, ALL_LINEAR)}
    adapters = {}
    for label, (rank, modules) in setups.items():
        for i in range(min(max(batches), args.max_distinct)):
            name = f"{label.split()[1]}-{len(modules)}-{i}"
            adapters.setdefault(label, []).append(name)
            engine.lora.register(name, random_adapter(name, mc, rank, modules, i, runner.page_size, runner.dtype,
                                                      pin_memory=on_gpu))
    w_bytes = weight_bytes(engine)
    local = runner.model_config  # the shard of rank 0 (the whole model at TP 1)
    kv_per_token = local.num_layers * 2 * local.num_kv_heads * local.head_dim * runner.dtype.itemsize

    def adapter_bytes(name: str) -> int:  # one rank's shard
        return engine.lora.get(name).num_bytes // size
    rows = []
    for batch in batches:
        cases = [("LoRA off", [None] * batch, 0)]
        for label, names in adapters.items():
            one = adapter_bytes(names[0])
            cases.append((f"1 adapter, {label}", [names[0]] * batch, one))
            mixed = [names[i % len(names)] for i in range(batch)]
            if batch > 1:
                    cases.append((f"{len(set(mixed))} adapters, {label}", mixed,
                              sum(adapter_bytes(n) for n in set(mixed))))
        for label, names, a_bytes in cases:
            engine.config.async_scheduling = False  # the same step without overlap, for comparison
            sync_seconds, _ = decode_step_time(engine, batch, args.context, names, args.steps)
            engine.config.async_scheduling = True
            seconds, ctx = decode_step_time(engine, batch, args.context, names, args.steps)
            floor = (w_bytes + a_bytes + batch * ctx * kv_per_token) / bandwidth
            rows.append({"batch": batch, "case": label, "step_ms": seconds * 1e3, "sync_step_ms": sync_seconds * 1e3,
                         "floor_ms": floor * 1e3, "frac_of_floor": floor / seconds, "tokens_per_s": batch / seconds})
            print(f"{batch:>5} | {label:<34} | {seconds * 1e3:8.2f} ms (sync {sync_seconds * 1e3:6.2f}) | "
                  f"floor {floor * 1e3:6.2f} ms | {floor / seconds:5.2f} of floor | {batch / seconds:9.0f} tok/s",
                  flush=True)
    mode = "fully sharded" if args.fully_sharded_loras else "default"
    print(f"\ndevice: {device_name()} x {size} (shape {args.shape}, LoRA sharding {mode}); copy bandwidth of one "
          f"device measured in this run: {bandwidth / 1e12:.3f} TB/s (the floor divides by it); "
          f"command: {' '.join(sys.argv)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(), "tensor_parallel_size": size, "shape": args.shape,
                       "fully_sharded_loras": args.fully_sharded_loras, "copy_bandwidth_bytes_per_s": bandwidth,
                       "rows": rows}, f, indent=1)
    engine.runner.close()


if __name__ == "__main__":
    main()
