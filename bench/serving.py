"""Serving benchmark: S-LoRA's synthetic workload through tritonserver (tritonclient gRPC streaming,
one stream per request) and, in the same run, engine-direct (AsyncEngine in this process) on the
same arrival schedule and the same adapters, so the table shows what the Triton front end costs.

    PYTHONPATH=. python bench/serving.py [--configs s1:5:20,s1:2000:20,s1:2000:2]
        [--duration 40] [--grace 10] [--json out.json] [--server-log tritonserver.log]

Default model: a Llama-7B-shaped config with random fp16 weights (``load_format: dummy``); adapters
are PEFT directories under a temporary adapter root, ``--distinct-files`` real files of rank 8 (fewer
of higher ranks) and every other name a directory symlink to one of them (the engine loads each name
as its own adapter).
S1: rank 8 on q,k,v,o. S2: ranks 8, 16, 32, 64 in turn. Requests send ``input_ids`` (INT32),
``lora_name``, ``sampling_parameters`` {max_tokens = output length, ignore_eos, temperature 0}.

Each configuration runs ``--duration`` s of arrivals, then at most ``--grace`` s more; whatever is
still running then is cancelled. Throughputs are over that window: finished requests, and
generated tokens of all requests. On the GPU machine run it with the venv of
tools/gpu_triton_setup.sh (the Python backend's stub needs numpy < 2): ``V/bin/python bench/serving.py``.
"""
from __future__ import annotations

import os
import sys

# Run as a script, Python puts bench/ first on sys.path, where bench/engine.py would shadow the
# `engine` package: put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import asyncio
import json
import shlex
import shutil
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

import numpy as np

from bench.serving_workload import (SLO_TTFT_S, RequestRecord, WorkloadRequest, generate_workload,
                                    summarize, window_token_throughputs)
from multilora_serve.launcher import DEFAULT_MODEL_REPOSITORY, TritonServer

MODEL_NAME = "multilora"
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
SUITES = {"s1": [8], "s2": [8, 16, 32, 64]}  # S-LoRA's settings: ranks of the adapters


@dataclass(frozen=True)
class Config:
    suite: str
    num_adapters: int
    rate: float

    @property
    def label(self) -> str:
        return f"{self.suite.upper()} n={self.num_adapters} {self.rate:g} req/s"


# -- model and adapters on disk ------------------------------------------------------------------
def write_adapters(root: str, model_dir: str, max_adapters: int, suites: list[str], distinct: int,
                   seed: int) -> dict[str, list[str]]:
    """Adapter directories under ``root``: ``base-r{rank}-{j}`` files (PEFT format; ``distinct`` of
    rank 8, proportionally fewer of higher ranks, so each rank takes the same disk) and, per suite,
    names ``{suite}-{i}`` that are directory symlinks to them. Returns the names per suite
    (and "warmup": the base directories)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from helpers import write_raw_adapter

    from engine.config import ModelConfig

    model = ModelConfig.from_dir(model_dir)
    shapes = model.projection_shapes()
    os.makedirs(root, exist_ok=True)
    names: dict[str, list[str]] = {"warmup": []}
    bases: dict[int, list[str]] = {}
    for rank in sorted({r for s in suites for r in SUITES[s]}):
        for j in range(max(4, distinct * 8 // rank)):
            base = f"base-r{rank}-{j}"
            if not os.path.isfile(os.path.join(root, base, "adapter_config.json")):
                write_raw_adapter(os.path.join(root, base), model.num_layers, shapes, rank, QKVO,
                                  seed=seed + 1000 * rank + j)
            bases.setdefault(rank, []).append(base)
            names["warmup"].append(base)
    for suite in suites:
        ranks = SUITES[suite]
        names[suite] = []
        for i in range(max_adapters):
            rank = ranks[i % len(ranks)]
            name = f"{suite}-{i}"
            link = os.path.join(root, name)
            if not os.path.islink(link):
                os.symlink(bases[rank][(i // len(ranks)) % len(bases[rank])], link)  # relative, inside root
            names[suite].append(name)
    return names


def model_vocab_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def warmup_workload(names: list[str], vocab_size: int, input_range: tuple[int, int],
                    num_requests: int) -> list[WorkloadRequest]:
    """``max_num_seqs`` requests at once, prompts spread over the input range, outputs of 2 to 41
    tokens: the decode batch shrinks from full through every CUDA-graph bucket, so kernels are
    compiled and graphs captured before anything is timed."""
    rng = np.random.default_rng(12345)
    lengths = np.linspace(input_range[0], input_range[1] - 1, num_requests).astype(int)
    return [WorkloadRequest(i, 0.0, names[i % len(names)], int(n), 2 + (40 * i) // num_requests,
                            tuple(int(t) for t in rng.integers(3, vocab_size, int(n))))
            for i, n in enumerate(lengths)]


# -- the Triton path --------------------------------------------------------------------------------
def triton_inputs(req: WorkloadRequest) -> list:
    import tritonclient.grpc.aio as grpcclient

    params = json.dumps({"max_tokens": req.output_len, "ignore_eos": True, "temperature": 0})
    ids = grpcclient.InferInput("input_ids", [req.input_len], "INT32")
    ids.set_data_from_numpy(np.asarray(req.prompt_ids, dtype=np.int32))
    tensors = [ids]
    for name, value, datatype, dtype in (("lora_name", req.adapter.encode(), "BYTES", np.object_),
                                         ("sampling_parameters", params.encode(), "BYTES", np.object_),
                                         ("stream", True, "BOOL", bool)):
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=dtype))
        tensors.append(tensor)
    return tensors


async def triton_request(client, record: RequestRecord) -> None:
    """One request on its own gRPC stream; records every response."""
    import tritonclient.grpc.aio as grpcclient

    req = record.request
    done = asyncio.Event()
    item = {"model_name": MODEL_NAME, "inputs": triton_inputs(req), "request_id": str(req.index),
            "outputs": [grpcclient.InferRequestedOutput("output_ids")]}

    async def requests():
        yield item
        await done.wait()  # keep the stream open until the final response

    record.sent = time.perf_counter()
    stream = client.stream_infer(requests())
    try:
        async for result, error in stream:
            now = time.perf_counter()
            if error is not None:
                record.error = str(error)
                break
            record.num_responses += 1
            ids = result.as_numpy("output_ids")
            if ids is not None and ids.size:
                record.chunks.append((now, int(ids.size)))
            final = result.get_response().parameters.get("triton_final_response")
            if (final is not None and final.bool_param) or record.num_tokens >= req.output_len:
                record.finished = True
                break
    except asyncio.CancelledError:
        stream.cancel()
        raise
    except Exception as error:  # noqa: BLE001 - a broken stream is a failed request, not a failed run
        record.error = f"{type(error).__name__}: {error}"
    finally:
        done.set()


async def triton_run(url: str, workload: list[WorkloadRequest], stop_after_s: float) -> tuple[list, float, float]:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        return await drive(workload, stop_after_s, lambda record: triton_request(client, record))
    finally:
        await client.close()


async def drive(workload: list[WorkloadRequest], stop_after_s: float, submit) -> tuple[list, float, float]:
    """Send each request at its arrival time (``submit(record)`` is a coroutine that runs until the
    request ends); cancel what is still running ``stop_after_s`` after the start. Returns the records,
    the start and the end of the measurement (the last completion, or the cut-off)."""
    records = [RequestRecord(req) for req in workload]
    tasks: list[asyncio.Task] = []
    start = time.perf_counter() + 0.2

    async def dispatch():
        for record in records:
            delay = start + record.request.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(submit(record)))

    dispatcher = asyncio.ensure_future(dispatch())
    deadline = start + stop_after_s
    while time.perf_counter() < deadline:
        if dispatcher.done() and all(t.done() for t in tasks):
            break
        await asyncio.sleep(0.05)
    end = min(time.perf_counter(), deadline)
    finished_times = [r.chunks[-1][0] for r in records if r.finished and r.chunks]
    if dispatcher.done() and all(t.done() for t in tasks) and finished_times:
        end = max(finished_times)
    dispatcher.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(dispatcher, *tasks, return_exceptions=True)
    for record in records:  # what came after the end of the measurement does not count
        if record.chunks and record.chunks[-1][0] > end:
            record.chunks = [c for c in record.chunks if c[0] <= end]
            record.finished = False
    return records, start, end


def prometheus_values(url: str) -> dict[str, float]:
    """Sum of each multilora_* metric over its labels."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("multilora_") and " " in line:
            key, _, value = line.rpartition(" ")
            name = key.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(value)
    return values


def server_stats(server: TritonServer) -> dict[str, float]:
    m = prometheus_values(server.metrics_url)
    return {"num_running": m.get("multilora_num_requests_running", 0.0),
            "num_waiting": m.get("multilora_num_requests_waiting", 0.0),
            "adapter_loads": m.get("multilora_adapter_loads_total", 0.0),
            "adapter_load_seconds": m.get("multilora_adapter_load_seconds_total", 0.0),
            "adapter_misses": m.get("multilora_adapter_cache_misses_total", 0.0),
            "adapter_evictions": m.get("multilora_adapter_evictions_total", 0.0),
            "preemptions": m.get("multilora_preemptions_total", 0.0),
            "engine_steps": m.get("multilora_engine_steps_total", 0.0)}


def engine_stats(engine) -> dict[str, float]:
    s = engine.stats()
    return {"num_running": s.num_running, "num_waiting": s.num_waiting, "adapter_loads": s.adapter_loads_total,
            "adapter_load_seconds": s.adapter_load_seconds_total,
            "adapter_misses": s.adapter_misses_total, "adapter_evictions": s.adapter_evictions_total,
            "preemptions": s.num_preemptions_total, "engine_steps": s.steps_total}


def wait_idle(stats, timeout_s: float = 60.0) -> bool:
    """Wait until the engine has nothing running or waiting (cancelled requests take a moment) and
    no adapter has come from disk for 1 s (loads queued for cut-off requests still finish)."""
    deadline = time.monotonic() + timeout_s
    last_loads, quiet_since = None, time.monotonic()
    while time.monotonic() < deadline:
        s = stats()
        if s["adapter_loads"] != last_loads:
            last_loads, quiet_since = s["adapter_loads"], time.monotonic()
        if s["num_running"] == 0 and s["num_waiting"] == 0 and time.monotonic() - quiet_since >= 1.0:
            return True
        time.sleep(0.2)
    return False


# -- the engine-direct path -------------------------------------------------------------------------
async def direct_run(engine, workload: list[WorkloadRequest], stop_after_s: float, run_id: str) -> tuple[list, float, float]:
    from engine.errors import EngineError
    from engine.sampling_params import SamplingParams

    async def submit(record: RequestRecord) -> None:
        req = record.request
        request_id = f"{run_id}-{req.index}"
        finished = asyncio.Event()
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()

        def on_output(out) -> None:  # engine thread: record, never block
            now = time.perf_counter()
            if cancelled.is_set():  # cut off: what follows is the abort
                return
            record.num_responses += 1
            if out.token_ids:
                record.chunks.append((now, len(out.token_ids)))
            if out.finished:
                if out.error is not None or out.finish_reason == "abort":
                    record.error = str(out.error or "aborted")
                else:
                    record.finished = True
                loop.call_soon_threadsafe(finished.set)

        params = SamplingParams(temperature=0, max_tokens=req.output_len, ignore_eos=True)
        record.sent = time.perf_counter()
        try:
            engine.add_request(request_id, None, list(req.prompt_ids), params, req.adapter, on_output)
        except EngineError as error:
            record.error = f"{type(error).__name__}: {error}"
            return
        try:
            await finished.wait()
        except asyncio.CancelledError:
            cancelled.set()
            engine.abort(request_id)
            raise

    return await drive(workload, stop_after_s, submit)


# -- running the configurations ---------------------------------------------------------------------
def run_path(path: str, configs: list[Config], workloads: dict[Config, list[WorkloadRequest]],
             warmup: list[WorkloadRequest], args, engine_args: dict, deadline: float, log,
             results: list[dict]) -> None:
    """Start the server (or the engine), warm it up, run each configuration in turn; appends a row
    per configuration to ``results`` as it goes."""
    server = engine = None
    t_start = time.monotonic()
    if path == "triton":
        server = TritonServer(args.model_repository, http_port=None, grpc_port=None, metrics_port=None,
                              engine_args=engine_args, ready_timeout=600, log_file=args.server_log,
                              exit_timeout_s=5, log_verbose=args.log_verbose)
        server.start()
        stats = lambda: server_stats(server)  # noqa: E731
        run = lambda wl, stop, rid: triton_run(server.grpc_url, wl, stop)  # noqa: E731
    else:
        from engine.async_engine import AsyncEngine

        version_dir = os.path.join(args.model_repository, MODEL_NAME, "1")
        multi_lora = os.path.join(version_dir, "multi_lora.json")
        engine = AsyncEngine.from_files(os.path.join(version_dir, "engine.json"),
                                        multi_lora if os.path.isfile(multi_lora) else None, engine_args)
        engine.start()
        stats = lambda: engine_stats(engine)  # noqa: E731
        run = lambda wl, stop, rid: direct_run(engine, wl, stop, rid)  # noqa: E731
    try:
        log(f"[{path}] started in {time.monotonic() - t_start:.1f} s" + ("; warming up" if warmup else ""))
        t = time.monotonic()
        records, _, _ = asyncio.run(run(warmup, 120.0, "warmup")) if warmup else ([], 0.0, 0.0)
        bad = [r.error for r in records if not r.finished]
        log(f"[{path}] warm-up: {len(records) - len(bad)}/{len(records)} finished in {time.monotonic() - t:.1f} s"
            + (f"; first error: {bad[0]}" if bad else ""))
        if warmup and not any(r.chunks for r in records):  # nothing works: do not spend the budget on it
            tail = f"\n{server.log_tail(40)}" if server is not None else ""
            raise RuntimeError(f"the warm-up produced no tokens (first error: {bad[0] if bad else None}){tail}")
        wait_idle(stats)
        for i, config in enumerate(configs):
            workload = workloads[config]
            stop_after = max(args.duration, workload[-1].arrival_s if workload else 0.0) + args.grace
            if time.monotonic() + stop_after + 5 > deadline:
                log(f"[{path}] {config.label}: skipped (time budget)")
                results.append({"path": path, "config": vars(config) | {"label": config.label},
                                "skipped": "time budget"})
                continue
            before = stats()
            records, start, end = asyncio.run(run(workload, stop_after, f"c{i}"))
            at_end = stats()
            idle = wait_idle(stats)
            after = stats()
            summary = summarize(records, start, end, args.slo_ttft)
            lateness = [r.sent - (start + r.request.arrival_s) for r in records if r.sent is not None]
            summary["send_lateness_ms_p99"] = float(np.percentile(lateness, 99)) * 1e3 if lateness else None
            summary["adapters"] = {k: after[k] - before[k] for k in ("adapter_loads", "adapter_load_seconds",
                                                                    "adapter_misses", "adapter_evictions",
                                                                    "preemptions")}
            # engine steps (batches) per second in the window: whether the engine itself slowed down,
            # or only the delivery of its tokens (Triton's counter lags by up to 0.1 s)
            summary["engine_steps_per_s"] = (at_end["engine_steps"] - before["engine_steps"]) / max(end - start, 1e-9)
            summary["idle_after"] = idle
            if args.window:
                summary["token_throughput_windows"] = window_token_throughputs(records, start, end, args.window)
            results.append({"path": path, "config": vars(config) | {"label": config.label}, "summary": summary})
            if args.window:
                log(f"[{path}] {config.label}: tokens/s per {args.window:g} s window: "
                    + ", ".join(f"{v:.0f}" for v in summary["token_throughput_windows"]))
            log(f"[{path}] {config.label}: {summary['num_finished']}/{summary['num_sent']} finished, "
                f"{summary['request_throughput']:.2f} req/s, {summary['token_throughput']:.0f} tok/s, "
                f"TTFT p50 {fmt(summary['ttft_ms']['p50'])} ms, send lateness p99 "
                f"{fmt(summary['send_lateness_ms_p99'], 1)} ms, idle after: {idle}, errors {summary['num_errors']} "
                f"{summary['first_errors']}")
    finally:
        if server is not None:
            server.stop()
        if engine is not None:
            engine.shutdown()
            # where the engine loop's time went (through Triton: the same line is in the server's log)
            log(f"[{path}] engine loop: {engine.engine.stats.steps_total} steps; "
                + ", ".join(f"{k} {v:.1f} s" for k, v in engine.loop_seconds.items()))


def fmt(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(results: list[dict]) -> None:
    header = ("| config | path | finished/sent | req/s | tok/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms "
              "| SLO (TTFT<6s) | resp/token | adapter loads/misses | engine steps/s |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        if "config" not in r:
            print(f"| - | {r['path']} | failed: {r['error'].splitlines()[0][:120]} |  |  |  |  |  |  |  |")
            continue
        config = r["config"]["label"]
        if "skipped" in r:
            print(f"| {config} | {r['path']} | skipped ({r['skipped']}) |  |  |  |  |  |  |  |")
            continue
        s = r["summary"]
        t, i, a = s["ttft_ms"], s["itl_ms"], s["adapters"]
        slo = "-" if s["slo_attainment"] is None else f"{100 * s['slo_attainment']:.0f}%"
        print(f"| {config} | {r['path']} | {s['num_finished']}/{s['num_sent']} | {s['request_throughput']:.2f} "
              f"| {s['token_throughput']:.0f} | {fmt(t['p50'])}/{fmt(t['p90'])}/{fmt(t['p99'])} "
              f"| {fmt(i['p50'], 1)}/{fmt(i['p90'], 1)}/{fmt(i['p99'], 1)} | {slo} "
              f"| {fmt(s['responses_per_token'], 3)} | {a['adapter_loads']:.0f}/{a['adapter_misses']:.0f} "
              f"| {fmt(s.get('engine_steps_per_s'))} |")


def targets(results: list[dict]) -> dict:
    """The performance issue's serving targets, from the rows that ran."""
    rows = {(r["path"], r["config"]["suite"], r["config"]["num_adapters"], r["config"]["rate"]): r["summary"]
            for r in results if "summary" in r}
    out = {}
    for (path, suite, n, rate), s in rows.items():
        if path == "triton" and ("direct", suite, n, rate) in rows:
            d = rows[("direct", suite, n, rate)]
            key = f"{suite} n={n} {rate:g} req/s"
            out[f"triton/direct token throughput, {key}"] = (
                s["token_throughput"] / d["token_throughput"] if d["token_throughput"] else None)
            out[f"triton/direct request throughput, {key}"] = (
                s["request_throughput"] / d["request_throughput"] if d["request_throughput"] else None)
            if s.get("engine_steps_per_s") and d.get("engine_steps_per_s"):
                out[f"triton/direct engine steps/s, {key}"] = s["engine_steps_per_s"] / d["engine_steps_per_s"]
            for name in ("ttft_ms", "itl_ms"):
                if s[name]["p50"] is not None and d[name]["p50"] is not None:
                    out[f"triton - direct median {name[:-3].upper()} ms, {key}"] = s[name]["p50"] - d[name]["p50"]
        if path == "triton":
            smaller = [k for k in rows if k[0] == path and k[1] == suite and k[3] == rate and k[2] < n]
            if smaller:
                base = rows[min(smaller, key=lambda k: k[2])]
                out[f"triton token throughput n={n} / n={min(k[2] for k in smaller)}, {suite} {rate:g} req/s"] = (
                    s["token_throughput"] / base["token_throughput"] if base["token_throughput"] else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", default="s1", help="comma-separated: s1 (rank 8), s2 (ranks 8/16/32/64)")
    ap.add_argument("--adapters", default="5,2000", help="numbers of adapters n, comma-separated")
    ap.add_argument("--rates", default="20", help="request rates (req/s), comma-separated")
    ap.add_argument("--configs", default="s1:5:20,s1:2000:20,s1:2000:2",
                    help="SUITE:N:RATE,... (overrides --suites/--adapters/--rates; '' to use those)")
    ap.add_argument("--alpha", type=float, default=1.0, help="power-law exponent (S-LoRA: 1, i.e. uniform)")
    ap.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the gaps (1: Poisson)")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per configuration")
    ap.add_argument("--grace", type=float, default=10.0, help="seconds after the arrivals before cancelling")
    ap.add_argument("--input-range", type=int, nargs=2, default=(8, 512))
    ap.add_argument("--output-range", type=int, nargs=2, default=(8, 512))
    ap.add_argument("--slo-ttft", type=float, default=SLO_TTFT_S)
    ap.add_argument("--paths", default="triton,direct",
                    help="run triton before direct: the direct engine holds this process's GPU memory")
    ap.add_argument("--model", default=None, help="model directory (default: a Llama-7B-shaped config, "
                                                  "random weights)")
    ap.add_argument("--load-format", default=None, help="default: dummy when --model is not given")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--max-num-seqs", type=int, default=256,
                    help="20 req/s of S1 keeps about 180 requests running (Little's law at ~9 s each)")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="more engine overrides (JSON values), as multilora-serve's")
    ap.add_argument("--adapter-root", default=None, help="where adapters are written (default: a temp dir)")
    ap.add_argument("--distinct-files", type=int, default=50,
                    help="real adapter files of rank 8 (of rank r: this x 8 / r, at least 4)")
    ap.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY))
    ap.add_argument("--server-log", default=None, help="tritonserver's log file")
    ap.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose")
    ap.add_argument("--time-budget", type=float, default=450.0,
                    help="seconds for the whole run; configurations that would overrun it are skipped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-warmup", action="store_true",
                    help="no untimed warm-up before the first configuration (cold-start runs)")
    ap.add_argument("--window", type=float, default=0.0,
                    help="also report tokens/s per window of this many seconds (cold-start runs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t_begin = time.monotonic()
    deadline = t_begin + args.time_budget

    def log(message: str) -> None:
        print(f"[{time.monotonic() - t_begin:6.1f} s] {message}", file=sys.stderr, flush=True)

    from bench.common import write_model_dir
    from multilora_serve.launcher import parse_engine_args

    work = tempfile.mkdtemp(prefix="multilora-serving-")
    try:
        model_dir = os.path.abspath(args.model) if args.model else write_model_dir(os.path.join(work, "model"))
        load_format = args.load_format or ("safetensors" if args.model else "dummy")
        suites = args.suites.split(",")
        counts = [int(n) for n in args.adapters.split(",")]
        rates = [float(r) for r in args.rates.split(",")]
        if args.configs:
            configs = [Config(s, int(n), float(r)) for s, n, r in (c.split(":") for c in args.configs.split(","))]
            suites = sorted({c.suite for c in configs})
            counts = sorted({c.num_adapters for c in configs})
        else:
            configs = [Config(s, n, r) for s in suites for r in rates for n in counts]
        unknown = sorted(set(suites) - set(SUITES))
        if unknown:
            raise SystemExit(f"unknown suite(s) {unknown}; known: {sorted(SUITES)}")
        root = os.path.abspath(args.adapter_root or os.path.join(work, "adapters"))
        t = time.monotonic()
        names = write_adapters(root, model_dir, max(counts), suites, args.distinct_files, args.seed)
        log(f"adapters under {root}: {args.distinct_files} files of rank 8, {max(counts)} names per suite, "
            f"{time.monotonic() - t:.1f} s")
        engine_args = {"model": model_dir, "load_format": load_format, "dtype": args.dtype,
                       "max_num_seqs": args.max_num_seqs, "lora_roots": [root]}
        engine_args.update(parse_engine_args(args.engine_arg))
        vocab = model_vocab_size(model_dir)
        workloads = {c: generate_workload(c.num_adapters, args.alpha, c.rate, args.cv, args.duration,
                                          names[c.suite], tuple(args.input_range), tuple(args.output_range),
                                          vocab, seed=args.seed) for c in configs}
        warmup = [] if args.no_warmup else warmup_workload(
            names["warmup"], vocab, tuple(args.input_range), int(engine_args.get("max_num_seqs", args.max_num_seqs)))
        results: list[dict] = []
        paths = args.paths.split(",")
        for i, path in enumerate(paths):
            # each path gets an equal share of the time left, so the comparison has both sides
            path_deadline = time.monotonic() + (deadline - time.monotonic()) / (len(paths) - i)
            try:
                run_path(path, configs, workloads, warmup, args, engine_args, path_deadline, log, results)
            except Exception as error:  # noqa: BLE001 - report it, and still run the other path
                log(f"[{path}] failed: {type(error).__name__}: {error}")
                results.append({"path": path, "error": f"{type(error).__name__}: {error}"})
            write_json(args, results, engine_args)
        from bench.common import device_name

        print_table(results)
        for key, value in targets(results).items():
            print(f"{key}: {fmt(value, 3)}")
        print(f"\ndevice: {device_name()}; command: {shlex.join([sys.executable] + sys.argv)}; "
              f"workload: alpha {args.alpha}, cv {args.cv}, {args.duration:g} s of arrivals + {args.grace:g} s, "
              f"inputs {args.input_range}, outputs {args.output_range}; engine args {json.dumps(engine_args)}")
        write_json(args, results, engine_args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_json(args, results: list[dict], engine_args: dict) -> None:
    if not args.json:
        return
    from bench.common import device_name

    with open(args.json, "w") as f:
        json.dump({"device": device_name(), "command": shlex.join([sys.executable] + sys.argv),
                   "args": vars(args), "engine_args": engine_args, "results": results,
                   "targets": targets(results)}, f, indent=1)


if __name__ == "__main__":
    main()
