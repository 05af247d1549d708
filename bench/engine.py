"""Engine-direct decode step time on a Llama-shaped fp16 model with random weights, against
its memory-bandwidth floor: LoRA off, one adapter for the whole batch, and every sequence its own;
each LoRA row's throughput over the LoRA-off row of its batch. Then prefill steps of 2,048 prompt
tokens (16 prompts of 128) with LoRA off, 1 adapter and 16 adapters (rank 16 all-linear): tokens/s
and LoRA-on/LoRA-off; on the Triton kernels at TP 1, with the LoRA of every projection group both
as the fused kernel and as the split pair (shrink + expand), and decode both ways with
``--decode-kernels fused,split``. ``--lora-schedule overlap,serial`` runs every decode LoRA row both
with the LoRA beside the base GEMM on its own stream and deferred to the next op (engine/lora_batch.py,
the default) and serially in place, in the same run.

    PYTHONPATH=. python bench/engine.py [--batches 1,8,32,64,128,256] [--context 256] [--json out.json]
        [--shape 7b|13b|70b|tiny] [--tensor-parallel-size N] [--fully-sharded-loras] [--max-distinct 64]
        [--decode-kernels default|fused|split|fused,split] [--lora-schedule overlap|serial|overlap,serial]
        [--pdl on|off|on,off]
        [--no-prefill]
    PYTHONPATH=. python bench/engine.py --tiny   # the tiny shape, batches 1,4, context 16, prefill 64 tokens
    # (a smoke run on whatever device there is; on a CPU, TRITON_INTERPRET=1 ... --tiny --kernels triton
    # runs the kernels in the interpreter)

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
from kernels import tiles

PREFILL_PROMPTS = 16  # a prefill step's prompts (each its own adapter in the 16-adapter case)



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
    for _ in range(2):  # untimed: a decode graph not yet captured for this bucket is captured here
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


def set_lora_schedule(engine: LLMEngine, schedule: str, carveout=..., pdl: bool = True) -> None:
    """overlap: the LoRA on its own stream beside the base GEMM, deferred to the next op (the
    engine's default); serial: on the main stream, added in place. ``carveout``: SMs that a GEMM
    beside the LoRA stream leaves to it (Ops.lora_sm_carveout: an int, or None for the engine's
    choice; left out, unchanged). ``pdl``: the Triton kernels launched with programmatic dependent
    launch (Ops.pdl).
    The decode graphs captured under other settings are dropped (the next step of each bucket captures
    its own)."""
    ops = engine.runner.ops
    on = schedule != "serial"
    carveout = ops.lora_sm_carveout if carveout is ... else carveout
    if (ops.overlap_lora, ops.defer_lora, ops.lora_sm_carveout, ops.pdl) != (on, on, carveout, pdl):
        ops.overlap_lora = ops.defer_lora = on
        ops.lora_sm_carveout = carveout
        ops.pdl = pdl
        if engine.runner.graphs is not None:
            engine.runner.graphs.recapture_lazily()


def prefill_rows(engine: LLMEngine, adapters: list[str], num_tokens: int, repeats: int, single: bool) -> list[dict]:
    """LoRA off, 1 adapter, 16 adapters; on the kernels at TP 1 (``single``: the choice is made in
    this process, so not for the other ranks), LoRA fused (tiles.lora_fused) and split, the split
    pair both ways of engine/lora_batch.py: "into GEMM" (the term stored first, then added by the
    base GEMM, the engine's default) and "in place" (added into the GEMM's output after it)."""
    kernels = ["fused", "split into GEMM", "split in place"] if engine.runner.ops.use_kernels and single \
        else ["default"]
    ops = engine.runner.ops
    into_gemm = ops.lora_into_gemm
    cases = [("LoRA off", [None] * PREFILL_PROMPTS), ("1 adapter, rank 16 all-linear", [adapters[0]] * PREFILL_PROMPTS),
             (f"{PREFILL_PROMPTS} adapters, rank 16 all-linear",
              [adapters[i % len(adapters)] for i in range(PREFILL_PROMPTS)])]
    rows, base = [], None
    fused_choice = tiles.lora_fused
    for kernel in kernels:
        tiles.lora_fused = {"split": lambda block_m: False, "fused": lambda block_m: True}.get(kernel.split()[0],
                                                                                             fused_choice)
        ops.lora_into_gemm = into_gemm and not kernel.endswith("in place")
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
                print(f"prefill {num_tokens} | {label:<34} | {rows[-1]['lora_kernels']:<15} | {seconds * 1e3:8.2f} ms | "
                      f"{tps:9.0f} tok/s | {tps / base:5.2f} of LoRA off", flush=True)
        finally:
            tiles.lora_fused = fused_choice
            ops.lora_into_gemm = into_gemm
    engine.config.async_scheduling = True
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--prefill-repeats", type=int, default=5)
    ap.add_argument("--no-prefill", action="store_true", help="decode rows only")
    ap.add_argument("--decode-kernels", default="default",
                    help="LoRA kernels of the decode rows: default (kernels/tiles.py's choice), fused, split, or "
                         "fused,split (each LoRA row both ways, TP 1 on the kernels)")
    ap.add_argument("--lora-schedule", default="overlap",
                    help="overlap (LoRA on its own stream beside the base GEMM, deferred to the next op: the "
                         "default), serial (in place, one stream), or overlap,serial (each LoRA row both ways)")
    ap.add_argument("--lora-sm-carveout", default="",
                    help="comma-separated SM counts that a GEMM beside the LoRA stream leaves to it (each decode "
                         "LoRA row under each; default: the engine's)")
    ap.add_argument("--pdl", default="on", help="on, off or on,off: the Triton kernels launched with programmatic "
                    "dependent launch where the GPU has it (each starts while the kernel before it ends, a split "
                    "expand while its shrink runs), or each after the one before; off rows are labelled no-pdl")
    ap.add_argument("--tiny", action="store_true", help="--shape tiny, batches 1,4, context 16, prefill 64 tokens, "
                    "on CUDA if there is one, else on the CPU (a smoke run: the figures mean nothing)")
    ap.add_argument("--kernels", default="auto", help="engine.json kernels: auto, triton (on a CPU with "
                    "TRITON_INTERPRET=1), reference")
    ap.add_argument("--json", default=None)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--max-distinct", type=int, default=64,
                    help="distinct adapters in a batch (larger batches reuse them; fewer make a 70B run start sooner)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--fully-sharded-loras", action="store_true", help="S-LoRA's sharding (mode 2)")
    args = ap.parse_args()
    if args.tiny:
        args.shape, args.batches, args.context, args.steps = "tiny", "1,4", 16, 2
        args.prefill_tokens, args.prefill_repeats = 64, 1
    on_gpu = torch.cuda.is_available()
    # bytes/s of one device, before the pool takes its memory
    bandwidth = copy_bandwidth("cuda" if on_gpu else "cpu", (1 << 30) if on_gpu else (64 << 20))
    model_dir = write_model_dir(tempfile.mkdtemp(), SHAPES[args.shape])
    size = args.tensor_parallel_size
    started = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=model_dir, load_format="dummy", dtype="float16" if on_gpu else "float32",
                                    max_num_seqs=16 if args.tiny else 256, max_num_batched_tokens=8192,
                                    gpu_memory_utilization=0.9, max_host_adapter_bytes=64 << 30,
                                    tensor_parallel_size=size, fully_sharded_loras=args.fully_sharded_loras,
                                    kernels=args.kernels))
    startup_s = time.perf_counter() - started  # weights, the memory profile, the warm-up's compiles and captures
    print(f"engine start-up: {startup_s:.1f} s", flush=True)
    mc, runner = engine.model_config, engine.runner
    batches = [int(b) for b in args.batches.split(",")]
    prefill = not args.no_prefill
    setups = {"rank 8 q,k,v,o": (8, QKVO), "rank 16 all-linear": (16, ALL_LINEAR)}
    adapters = {}
    for label, (rank, modules) in setups.items():
        for i in range(min(max(*batches, PREFILL_PROMPTS if prefill else 1), args.max_distinct)):
            name = f"{label.split()[1]}-{len(modules)}-{i}"
            adapters.setdefault(label, []).append(name)
            engine.lora.register(name, random_adapter(name, mc, rank, modules, i, runner.page_size, runner.dtype,
                                                      pin_memory=on_gpu))
    w_bytes = weight_bytes(engine)
    local = runner.model_config  # the shard of rank 0 (the whole model at TP 1)
    kv_per_token = local.num_layers * 2 * local.num_kv_heads * local.head_dim * runner.dtype.itemsize
    choices = {"default": tiles.lora_fused, "fused": lambda block_m: True, "split": lambda block_m: False}
    decode_kernels = args.decode_kernels.split(",")
    schedules = args.lora_schedule.split(",")
    pdl_choices = args.pdl.split(",")
    if not (runner.ops.use_kernels and size == 1):
        decode_kernels = ["default"]  # the choice is made in this process: not for other ranks' kernels
        schedules = ["overlap"]
        pdl_choices = ["on"]
    # each LoRA row under each (kernel, schedule); the fused kernel has no schedule of its own
    carveouts = [int(c) for c in args.lora_sm_carveout.split(",")] if args.lora_sm_carveout else [None]
    default_carveout = runner.ops.lora_sm_carveout
    decode_choices = [k if k == "fused" else f"{k} {s}" + ("" if c is None or s == "serial" else f" {c}")
                      + (" no-pdl" if p == "off" else "")
                      for k in decode_kernels for s in schedules for c in carveouts for p in pdl_choices]
    decode_choices = list(dict.fromkeys(decode_choices))

    def adapter_bytes(name: str) -> int:  # one rank's shard
        return engine.lora.get(name).num_bytes // size
    rows = []
    for batch in batches:
        lora_off_tps = {}  # per PDL choice
        cases = [("LoRA off", [None] * batch, 0, "-" if p == "on" else "- no-pdl") for p in pdl_choices]
        for label, names in adapters.items():
            mixed = [names[i % len(names)] for i in range(batch)]
            for kernel in decode_choices:
                cases.append((f"1 adapter, {label}", [names[0]] * batch, adapter_bytes(names[0]), kernel))
                if batch > 1:
                    cases.append((f"{len(set(mixed))} adapters, {label}", mixed,
                                  sum(adapter_bytes(n) for n in set(mixed)), kernel))
        for label, names, a_bytes, kernel in cases:
            words = kernel.split()
            pdl = words[-1] != "no-pdl"
            words = words if pdl else words[:-1]
            tiles.lora_fused = choices.get(words[0], choices["default"])
            set_lora_schedule(engine, words[1] if len(words) > 1 else "overlap",
                              int(words[2]) if len(words) > 2 else default_carveout, pdl)
            try:
                engine.config.async_scheduling = False  # the same step without overlap, for comparison
                sync_seconds, _ = decode_step_time(engine, batch, args.context, names, args.steps)
                engine.config.async_scheduling = True
                seconds, ctx = decode_step_time(engine, batch, args.context, names, args.steps)
            finally:
                tiles.lora_fused = choices["default"]
                set_lora_schedule(engine, "overlap", default_carveout)
            floor = (w_bytes + a_bytes + batch * ctx * kv_per_token) / bandwidth
            tps = batch / seconds
            lora_off_tps.setdefault(pdl, tps)  # the first cases are LoRA off
            rows.append({"batch": batch, "case": label, "lora_kernels": kernel, "step_ms": seconds * 1e3,
                         "sync_step_ms": sync_seconds * 1e3, "floor_ms": floor * 1e3, "frac_of_floor": floor / seconds,
                         "tokens_per_s": tps, "lora_on_off": tps / lora_off_tps[pdl]})
            print(f"{batch:>5} | {label:<34} | {kernel:<15} | {seconds * 1e3:8.2f} ms (sync {sync_seconds * 1e3:6.2f}) | "
                  f"floor {floor * 1e3:6.2f} ms | {floor / seconds:5.2f} of floor | {tps:9.0f} tok/s | "
                  f"{tps / lora_off_tps[pdl]:5.2f} of LoRA off", flush=True)
    prefill_table = (prefill_rows(engine, adapters["rank 16 all-linear"], args.prefill_tokens, args.prefill_repeats,
                                  runner.ops.use_kernels and size == 1) if prefill else [])
    mode = "fully sharded" if args.fully_sharded_loras else "default"
    header = (f"device: {device_name()} x {size} (shape {args.shape}, LoRA sharding {mode}); copy bandwidth of one "
              f"device measured in this run: {bandwidth / 1e12:.3f} TB/s (the floor divides by it); "
              f"engine start-up {startup_s:.1f} s; command: PYTHONPATH=. python {' '.join(sys.argv)}")
    print(f"\n{header}\n\n| batch | case | LoRA kernels | step ms | fraction of floor | LoRA-on / LoRA-off throughput |\n"
          f"| ---: | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['batch']} | {r['case']} | {r['lora_kernels']} | {r['step_ms']:.2f} | {r['frac_of_floor']:.2f} | "
              f"{r['lora_on_off']:.2f} |")
    if prefill_table:
        print("\n| prefill tokens | case | LoRA kernels | step ms | tokens/s | LoRA-on / LoRA-off |\n"
              "| ---: | --- | --- | ---: | ---: | ---: |")
    for r in prefill_table:
        print(f"| {r['tokens']} | {r['case']} | {r['lora_kernels']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['lora_on_off']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(), "tensor_parallel_size": size, "shape": args.shape,
                       "fully_sharded_loras": args.fully_sharded_loras, "copy_bandwidth_bytes_per_s": bandwidth,
                       "startup_s": startup_s, "command": header, "rows": rows, "prefill_rows": prefill_table}, f, indent=1)
    engine.runner.close()


if __name__ == "__main__":
    main()
