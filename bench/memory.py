"""Unified pool figures on the GPU: adapters resident in a given pool size against vLLM's slot
arithmetic, host -> pool load bandwidth of one adapter, and the cost of prefetch to a running
decode batch.

    PYTHONPATH=. python bench/memory.py [--pool-gib 40] [--json out.json]
"""
from __future__ import annotations

import os
import sys

# Run as a script, Python puts bench/ first on sys.path, where this file would shadow the
# `engine` package: put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import statistics
import tempfile
import time

import torch

from bench.common import ALL_LINEAR, QKVO, device_name, random_adapter, write_model_dir
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def vllm_slot_bytes(model, max_lora_rank: int, modules: list[str], dtype_bytes: int) -> int:
    """vLLM's per-slot buffers: every slot holds max_lora_rank for each module it serves."""
    shapes = model.projection_shapes()
    return model.num_layers * max_lora_rank * sum(shapes[m][0] + shapes[m][1] for m in modules) * dtype_bytes


def residency(engine: LLMEngine, pool_bytes: int, packed) -> dict:
    pages = pool_bytes // engine.runner.page_bytes
    ours = pages // packed.num_pages
    model = engine.model_config
    row = {"pool_gib": pool_bytes / 2**30, "adapter_mib": packed.num_bytes / 2**20, "pages_per_adapter": packed.num_pages,
           "multilora_adapters": ours}
    for max_rank in (16, 64):
        row[f"vllm_slots_max_rank_{max_rank}"] = pool_bytes // vllm_slot_bytes(model, max_rank, ALL_LINEAR, 2)
    return row


def load_bandwidth(engine: LLMEngine, packed, repeats: int = 20) -> dict:
    runner = engine.runner
    pages = list(range(packed.num_pages))
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        runner.load_adapter(packed, pages)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"adapter_mb": packed.num_bytes / 1e6, "load_ms": seconds * 1e3, "gb_per_s": packed.num_bytes / seconds / 1e9}


def prefetch_interference(engine: LLMEngine, names: list[str], batch: int, steps: int) -> dict:
    """Median decode step time of a LoRA batch, alone and with an adapter copy on the side stream each step."""
    params = SamplingParams(temperature=0, max_tokens=4 * steps + 16, ignore_eos=True)
    ids = []
    for i in range(batch):
        seq = engine.make_sequence(f"pf{i}", None, [1] + [5 + i] * 255, params, names[i % 8])
        engine.add(seq)
        ids.append(seq.request_id)
    while any(len(engine.seqs[r].output_token_ids) == 0 for r in ids):
        engine.step()
    spare = [engine.lora.get(n) for n in names[8:]]
    page_ids = [engine.pages.add_adapter(f"spare{i}", p.num_pages) for i, p in enumerate(spare)]

    def timed(with_copy: bool) -> float:
        times = []
        for i in range(steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            handle = engine.runner.load_adapter(spare[i % len(spare)], page_ids[i % len(spare)], prefetch=True) \
                if with_copy else None
            engine.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            del handle
        return statistics.median(times)

    alone, with_copy = timed(False), timed(True)
    alone = min(alone, timed(False))
    for r in ids:
        engine.abort(r)
    return {"batch": batch, "step_ms": alone * 1e3, "step_with_prefetch_ms": with_copy * 1e3,
            "slowdown": with_copy / alone - 1, "adapter_mb": spare[0].num_bytes / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool-gib", type=float, default=40.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model_dir = write_model_dir(tempfile.mkdtemp())
    engine = LLMEngine(EngineConfig(model=model_dir, load_format="dummy", dtype="float16", max_num_seqs=64,
                                    max_num_batched_tokens=4096, gpu_memory_utilization=0.9))
    mc, runner = engine.model_config, engine.runner
    r16 = random_adapter("r16", mc, 16, ALL_LINEAR, 0, runner.page_size, runner.dtype, pin_memory=True)
    result = {"device": device_name(), "page_mib": runner.page_bytes / 2**20,
              "residency": residency(engine, int(args.pool_gib * 2**30), r16),
              "load": load_bandwidth(engine, r16)}
    names = []
    for i in range(12):
        name = f"q{i}"
        engine.lora.register(name, random_adapter(name, mc, 16, ALL_LINEAR if i >= 8 else QKVO, i + 1,
                                                  runner.page_size, runner.dtype, pin_memory=True))
        names.append(name)
    result["prefetch"] = prefetch_interference(engine, names, batch=32, steps=20)
    res, load, pf = result["residency"], result["load"], result["prefetch"]
    print(f"page: {result['page_mib']:.2f} MiB (all layers)")
    print(f"rank-16 all-linear adapter: {res['adapter_mib']:.1f} MiB, {res['pages_per_adapter']} pages")
    print(f"adapters resident in {res['pool_gib']:.0f} GiB: multilora {res['multilora_adapters']} | vLLM slots "
          f"{res['vllm_slots_max_rank_16']} (max_lora_rank 16), {res['vllm_slots_max_rank_64']} (max_lora_rank 64)")
    print(f"host (pinned) -> pool load of one adapter: {load['load_ms']:.2f} ms, {load['gb_per_s']:.1f} GB/s")
    print(f"decode step, batch {pf['batch']} with 8 adapters: {pf['step_ms']:.2f} ms alone, "
          f"{pf['step_with_prefetch_ms']:.2f} ms with a {pf['adapter_mb']:.0f} MB prefetch per step "
          f"({pf['slowdown'] * 100:+.1f}%)")
    print(f"\ndevice: {device_name()}; command: {' '.join(sys.argv)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
