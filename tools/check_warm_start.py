"""Warm start on an empty Triton kernel cache: what is compiled at start-up, and what S1-like
traffic still compiles afterwards (the target is nothing).

    PYTHONPATH=. python tools/check_warm_start.py [--seconds 30] [--compare] [--cpu] [--json out.json]

Each run is a process of its own whose ``TRITON_CACHE_DIR`` is a fresh temporary directory, set
before Triton is imported: it builds ``engine.async_engine.AsyncEngine`` (a Llama-7B-shaped model
with random fp16 weights, ``load_format: dummy``; ``max_num_seqs`` 256), counts the kernels in the
cache (``*.cubin``) once the engine has started, drives it with S-LoRA's S1 workload for
``--seconds`` (arrivals at ``--rate`` req/s, prompt and output lengths uniform in [8, 512),
``--adapters`` names spread uniformly, a quarter of the requests sampled with temperature/top-p and
a seed, some asking for logprobs), aborts what is left, and counts again. Adapters are PEFT
directories under a temporary adapter root: rank 8 and 16, on q,k,v,o and on all linear layers
(``--files`` real files of each kind; the other names are directory symlinks to them, each loaded
as an adapter of its own). ``--compare`` runs the same with ``warmup: false``.
``--cpu``: the demo model, float32, its reference ops (no Triton: the counts are 0), 4 s of traffic;
it only shows that the script runs. Prints one table; exits 1 if the traffic of the warmed-up
run compiled anything (or a run failed).
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT  # bench/engine.py would shadow the engine package if bench/ came first

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

TOTAL_BUDGET_S = 470  # both runs, the adapters and the table: under 8 minutes
COLD_RUN_S = 150  # kept for the run with warmup: false (start, traffic, drain)
KINDS = [(8, "qkvo"), (16, "qkvo"), (8, "all"), (16, "all")]


# -- the parent: adapters, one child process per run, the table ------------------------------------
def write_adapters(root: str, model_dir: str, files: int, num_names: int) -> list[str]:
    """PEFT directories ``file-r{rank}-{modules}-{j}`` and ``num_names`` names linking to them in turn."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from bench.common import ALL_LINEAR, QKVO
    from engine.config import ModelConfig
    from helpers import write_raw_adapter

    model = ModelConfig.from_dir(model_dir)
    shapes = model.projection_shapes()
    bases = []
    for rank, kind in KINDS:
        for j in range(files):
            base = f"file-r{rank}-{kind}-{j}"
            write_raw_adapter(os.path.join(root, base), model.num_layers, shapes, rank,
                              QKVO if kind == "qkvo" else ALL_LINEAR, seed=100 * rank + j + (kind == "all"))
            bases.append(base)
    names = []
    for i in range(num_names):
        name = f"s1-{i}"
        os.symlink(bases[i % len(bases)], os.path.join(root, name))  # relative, inside the root
        names.append(name)
    return names


def run_child(args, warmup: bool, model_dir: str, root: str, names_file: str, timeout_s: float) -> dict:
    cache = tempfile.mkdtemp(prefix="triton-cache-")
    env = dict(os.environ, TRITON_CACHE_DIR=cache, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "on" if warmup else "off", "--model", model_dir,
           "--adapter-root", root, "--names", names_file, "--seconds", str(args.seconds), "--rate", str(args.rate)]
    if args.cpu:
        cmd.append("--cpu")
    label = "warmup on" if warmup else "warmup: false"
    try:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout_s)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            return {"run": label, "error": f"exit status {done.returncode}"}
        return {"run": label, **json.loads(lines[-1][len("RESULT "):])}
    except subprocess.TimeoutExpired:
        return {"run": label, "error": f"timed out after {timeout_s:.0f} s"}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def print_table(results: list[dict]) -> None:
    print("| run | start-up s | warm-up s (steps) | kernels compiled at start-up | kernels compiled during traffic "
          "| decode graphs at start-up / captured during traffic | requests finished/sent | output tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['run']} | failed: {r['error']} |  |  |  |  |  |  |")
            continue
        warm = "-" if r["warmup_s"] is None else f"{r['warmup_s']:.1f} ({r['warmup_steps']})"
        graphs = "-" if r["graphs_at_start"] is None else f"{r['graphs_at_start']} / {r['graphs_in_traffic']}"
        print(f"| {r['run']} | {r['startup_s']:.1f} | {warm} | {r['kernels_at_start']} | {r['kernels_in_traffic']} "
              f"| {graphs} | {r['finished']}/{r['sent']} | {r['tokens'] / r['traffic_s']:.0f} |")
    for r in results:
        if r.get("compiled_in_traffic"):
            print(f"\n{r['run']}: compiled during traffic: "
                  + ", ".join(f"{name} x{n}" for name, n in sorted(r["compiled_in_traffic"].items())))
            for spec in r.get("specializations_in_traffic", [])[:10]:
                print(f"  {spec}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=None, help="seconds of traffic (default 30; --cpu: 4)")
    ap.add_argument("--rate", type=float, default=None, help="requests per second (default 20; --cpu: 4)")
    ap.add_argument("--adapters", type=int, default=None, help="adapter names (default 200; --cpu: 8)")
    ap.add_argument("--files", type=int, default=2, help="real adapter files of each rank and module set")
    ap.add_argument("--compare", action="store_true", help="also run with warmup: false")
    ap.add_argument("--cpu", action="store_true", help="the demo model on CPU: only shows that the script runs")
    ap.add_argument("--json", default=None)
    # a child run (set by the parent)
    ap.add_argument("--child", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--adapter-root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--names", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.seconds = args.seconds if args.seconds is not None else (4.0 if args.cpu else 30.0)
    args.rate = args.rate if args.rate is not None else (4.0 if args.cpu else 20.0)
    if args.child is not None:
        return child(args)

    begin = time.monotonic()
    work = tempfile.mkdtemp(prefix="multilora-warm-start-")
    try:
        if args.cpu:
            model_dir = os.path.join(ROOT, "demo", "base")
        else:
            from bench.common import write_model_dir
            model_dir = write_model_dir(os.path.join(work, "model"))
        root = os.path.join(work, "adapters")
        os.makedirs(root)
        names = write_adapters(root, model_dir, args.files, args.adapters or (8 if args.cpu else 200))
        names_file = os.path.join(work, "names.json")
        with open(names_file, "w") as f:
            json.dump(names, f)
        print(f"[{time.monotonic() - begin:5.1f} s] {len(names)} adapter names, {args.files * len(KINDS)} files",
              file=sys.stderr, flush=True)
        results = []
        runs = [True, False] if args.compare else [True]
        for warmup in runs:
            left = TOTAL_BUDGET_S - (time.monotonic() - begin)
            reserve = COLD_RUN_S if warmup and args.compare else 0  # the run without warm-up comes next
            results.append(run_child(args, warmup, model_dir, root, names_file, left - reserve))
            print(f"[{time.monotonic() - begin:5.1f} s] {results[-1]['run']}: done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    device = results[0].get("device", "?")
    print(f"\ndevice: {device}; command: {shlex.join([sys.executable] + sys.argv)}; {time.monotonic() - begin:.0f} s "
          f"in all; traffic: S1-like, {args.seconds:g} s at {args.rate:g} req/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "command": shlex.join([sys.executable] + sys.argv), "results": results}, f,
                      indent=1)
    failed = any("error" in r for r in results)
    return 1 if failed or results[0]["kernels_in_traffic"] else 0


# -- a child: one engine on a fresh kernel cache --------------------------------------------------
def count_kernels(cache: str) -> Counter:
    """Compiled kernels in Triton's cache directory, by name (one .cubin per binary)."""
    return Counter(p.stem for p in Path(cache).rglob("*.cubin"))


def watch_compiles(log: list) -> None:
    """Note each specialization Triton is about to compile (in this process), where the hook exists."""
    try:
        import triton
        knobs = triton.knobs.runtime
    except (ImportError, AttributeError):
        return

    def hook(*args, **kwargs):
        try:
            log.append(str(kwargs.get("repr") or kwargs.get("fn") or args))
        except Exception:  # noqa: BLE001 - a note for the table must never stop a compile
            pass
        return None  # falsy: compile as usual

    knobs.jit_cache_hook = hook


def child(args) -> int:
    assert "triton" not in sys.modules, "TRITON_CACHE_DIR must be in place before Triton is imported"
    cache = os.environ["TRITON_CACHE_DIR"]
    specializations: list[str] = []
    watch_compiles(specializations)  # imports Triton, after the cache directory is set
    import logging

    import torch

    from bench.serving_workload import generate_workload
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    with open(args.names) as f:
        names = json.load(f)
    config = EngineConfig(model=args.model, load_format="safetensors" if args.cpu else "dummy",
                          dtype="float32" if args.cpu else "float16", device="cpu" if args.cpu else "auto",
                          max_num_seqs=16 if args.cpu else 256, lora_roots=[args.adapter_root],
                          warmup=args.child == "on")
    start = time.monotonic()
    engine = AsyncEngine(config)
    engine.start()
    startup_s = time.monotonic() - start
    at_start = count_kernels(cache)
    at_start_specs = len(specializations)
    report = engine.engine.warmup_report
    graphs = engine.engine.runner.graphs
    graphs_at_start = len(graphs.graphs) if graphs is not None else None

    max_len = engine.max_model_len
    lengths = (8, 512) if not args.cpu else (4, 30)
    lengths = (min(lengths[0], max_len // 2 - 1), min(lengths[1], max_len // 2))
    workload = generate_workload(len(names), 1.0, args.rate, 1.0, args.seconds, names, lengths, lengths,
                                 engine.engine.model_config.vocab_size, seed=0)
    lock = threading.Lock()
    live: set[str] = set()
    counts = Counter()

    def on_output(out) -> None:  # engine thread
        with lock:
            counts["tokens"] += len(out.token_ids)
            if out.finished:
                live.discard(out.request_id)
                counts["finished" if out.error is None and out.finish_reason != "abort" else "failed"] += 1

    traffic_start = time.monotonic()
    for req in workload:
        delay = traffic_start + req.arrival_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sampled = req.index % 4 == 3
        params = SamplingParams(max_tokens=req.output_len, ignore_eos=True, temperature=0.8 if sampled else 0.0,
                                top_p=0.95 if sampled else 1.0, seed=req.index if sampled else None,
                                logprobs=2 if req.index % 7 == 5 else None)
        request_id = f"s1-{req.index}"
        with lock:
            live.add(request_id)
        try:
            engine.add_request(request_id, None, list(req.prompt_ids), params, req.adapter, on_output)
            counts["sent"] += 1
        except Exception as error:  # noqa: BLE001 - a refused request is counted, not fatal
            with lock:
                live.discard(request_id)
            counts["refused"] += 1
            print(f"refused: {type(error).__name__}: {error}", file=sys.stderr)
    time.sleep(max(0.0, traffic_start + args.seconds - time.monotonic()))
    traffic_s = time.monotonic() - traffic_start
    with lock:
        unfinished = list(live)
    for request_id in unfinished:
        engine.abort(request_id)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (live or engine.stats().num_running or engine.stats().num_waiting):
        time.sleep(0.1)
    after = count_kernels(cache)
    graphs_after = len(graphs.graphs) if graphs is not None else None
    engine.shutdown()
    compiled = after - at_start
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else "cpu",
        "startup_s": startup_s,
        "warmup_s": report.seconds if report else None, "warmup_steps": report.num_steps if report else None,
        "kernels_at_start": sum(at_start.values()), "kernels_in_traffic": sum(compiled.values()),
        "compiled_in_traffic": dict(compiled), "specializations_in_traffic": specializations[at_start_specs:],
        "graphs_at_start": graphs_at_start,
        "graphs_in_traffic": None if graphs is None else graphs_after - graphs_at_start,
        "sent": counts["sent"], "finished": counts["finished"], "refused": counts["refused"],
        "tokens": counts["tokens"], "traffic_s": traffic_s,
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
