"""The engine process and the launcher killed under load, through a real tritonserver.

    python tools/gpu_faults.py [--cpu] [--requests 64] [--json out.json]

1. Engine killed: ``--requests`` streams decode long outputs; the engine process gets SIGKILL.
   Measured: when every stream had its FINAL error, when ``/v2/models/multilora/ready`` stopped
   answering 200, when the GPU memory was back to what it was before the server started, and how
   long loading the model again took (then one request must succeed).
2. Launcher killed: ``python -m multilora_serve`` with the same model gets SIGKILL once ready.
   Measured: when the last of its descendant processes (tritonserver, stub, engine) was gone,
   and the GPU memory after.
GPU: a Llama-7B-shaped model with random fp16 weights (``load_format: dummy``); ``--cpu``: the
demo model (the memory column is then empty). Prints one table.
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT
sys.path.insert(1, os.path.join(ROOT, "tests", "e2e"))

import argparse  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

from e2e_helpers import (MODEL, MODEL_REPOSITORY, StreamClient, cmdline, descendants, generate,  # noqa: E402
                         is_alive)
from multilora_serve.launcher import TritonServer  # noqa: E402

LONG = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}


def gpu_memory_mib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def wait_memory_back(baseline: float | None, since: float, timeout: float = 20.0) -> tuple[float | None, float | None]:
    """(seconds from ``since`` until the GPU memory was within 1 GiB of ``baseline``, last reading)."""
    if baseline is None:
        return None, None
    deadline = time.monotonic() + timeout
    reading = gpu_memory_mib()
    while reading is not None and reading > baseline + 1024 and time.monotonic() < deadline:
        time.sleep(0.1)
        reading = gpu_memory_mib()
    done = reading is not None and reading <= baseline + 1024
    return (time.monotonic() - since if done else None), reading


def model_ready(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{http_url}/v2/models/{MODEL}/ready", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def engine_killed(engine_args: dict, num_requests: int, baseline: float | None, log) -> dict:
    server = TritonServer(MODEL_REPOSITORY, host="127.0.0.1", http_port=None, grpc_port=None,
                          metrics_port=None, engine_args=engine_args, ready_timeout=600, exit_timeout_s=5)
    t = time.monotonic()
    server.start()
    result = {"start_s": time.monotonic() - t, "memory_serving_mib": gpu_memory_mib()}
    try:
        [core] = [p for p in descendants(server.process.pid) if "engine.core_server" in cmdline(p)]
        ids = [f"r{i}" for i in range(num_requests)]
        with StreamClient(server.grpc_url) as client:
            for request_id in ids:
                client.send(request_id, text="hello world", sampling=LONG)
            streaming: set[str] = set()
            deadline = time.monotonic() + 120
            while len(streaming) < len(ids) and time.monotonic() < deadline:
                streaming.add(client._incoming.get(timeout=120).request_id)
            log(f"{len(streaming)} streams decoding; SIGKILL to the engine process {core}")
            not_ready_at: list[float] = []

            def watch_ready() -> None:
                while time.monotonic() < killed + 10:
                    if not model_ready(server.http_url):
                        not_ready_at.append(time.monotonic())
                        return
                    time.sleep(0.01)

            killed = time.monotonic()
            os.kill(core, signal.SIGKILL)
            watcher = threading.Thread(target=watch_ready)
            watcher.start()
            responses = client.collect(ids, timeout=30, quiet_s=0.0)
            finals = [r for rid in ids for r in responses[rid] if r.final]
            last_final = time.monotonic()  # collect (quiet_s=0) returns at the last FINAL
            watcher.join()
        result.update({
            "streams": len(streaming),
            "finals": len(finals),
            "final_errors": sum(1 for r in finals if r.error and "SIGKILL" in r.error),
            "all_finals_s": last_final - killed,
            "not_ready_s": not_ready_at[0] - killed if not_ready_at else None,
        })
        result["memory_released_s"], result["memory_after_mib"] = wait_memory_back(baseline, killed)
        t = time.monotonic()
        request = urllib.request.Request(f"{server.http_url}/v2/repository/models/{MODEL}/load", data=b"",
                                         method="POST", headers=server.admin_headers)
        with urllib.request.urlopen(request, timeout=600) as reply:
            result["reload_status"] = reply.status
        result["reload_s"] = time.monotonic() - t
        status, reply = generate(server.http_url, {"text_input": "hello", "sampling_parameters":
                                                   json.dumps({"max_tokens": 8, "temperature": 0})})
        result["after_reload_ok"] = status == 200 and "text_output" in reply
    finally:
        server.stop()
    return result


def launcher_killed(engine_args: dict, baseline: float | None, log) -> dict:
    command = [sys.executable, "-m", "multilora_serve", "--host", "127.0.0.1", "--http-port", "0",
               "--grpc-port", "0", "--metrics-port", "0"]
    for key, value in engine_args.items():
        command += ["--engine-arg", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    deadline = time.monotonic() + 600
    for line in launcher.stdout:
        if "multilora ready" in line or time.monotonic() > deadline:
            break
    pids = descendants(launcher.pid)
    names = sorted({os.path.basename(cmdline(p).split(" ")[0]) for p in pids})
    log(f"launcher {launcher.pid} ready with descendants {pids} ({names}); SIGKILL to the launcher")
    killed = time.monotonic()
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    while any(is_alive(p) for p in pids) and time.monotonic() < killed + 30:
        time.sleep(0.05)
    left = [p for p in pids if is_alive(p)]
    result = {"descendants": len(pids), "left": len(left), "all_gone_s": None if left else time.monotonic() - killed}
    result["memory_released_s"], result["memory_after_mib"] = wait_memory_back(baseline, killed)
    for pid in left:  # do not leave them to the next run
        os.kill(pid, signal.SIGKILL)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the demo model on the CPU")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    work = tempfile.mkdtemp(prefix="multilora-faults-")
    try:
        if args.cpu:
            engine_args = {"max_model_len": 4096}
        else:
            from bench.common import write_model_dir

            engine_args = {"model": write_model_dir(os.path.join(work, "model")), "load_format": "dummy",
                           "dtype": "float16", "max_num_seqs": 256}
        baseline = gpu_memory_mib()
        results = {"engine killed": engine_killed(engine_args, args.requests, baseline, log),
                   "launcher killed": launcher_killed(engine_args, baseline, log)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    e, la = results["engine killed"], results["launcher killed"]
    fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    print("| case | figure | value | target |")
    print("|---|---|---|---|")
    print(f"| engine killed | streams with one FINAL error naming SIGKILL | {e['final_errors']}/{e['streams']} | all |")
    print(f"| engine killed | last FINAL after the kill, s | {fmt(e['all_finals_s'])} | <= 1 |")
    print(f"| engine killed | model not ready after, s | {fmt(e['not_ready_s'])} | <= 1 |")
    print(f"| engine killed | GPU memory back to the baseline after, s | {fmt(e['memory_released_s'])} | released |")
    print(f"| engine killed | load again, s (then a request: {'ok' if e['after_reload_ok'] else 'FAILED'}) "
          f"| {fmt(e['reload_s'], 1)} | |")
    print(f"| launcher killed | processes left of {la['descendants']} | {la['left']} | 0 |")
    print(f"| launcher killed | all gone after, s | {fmt(la['all_gone_s'])} | <= 10 |")
    print(f"| launcher killed | GPU memory back to the baseline after, s | {fmt(la['memory_released_s'])} | released |")
    print(f"\nGPU memory: {fmt(baseline, 0)} MiB before, {fmt(e['memory_serving_mib'], 0)} MiB serving; "
          f"server start {e['start_s']:.1f} s; command: {' '.join(sys.argv)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
