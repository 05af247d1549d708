"""bench/serving.py end to end on the CPU: S-LoRA's workload through a real tritonserver and
engine-direct, on the demo model, a few seconds each. Keeps the GPU benchmark's harness working."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from e2e_helpers import ROOT


def test_serving_benchmark_runs_both_paths(tmp_path):
    out = tmp_path / "serving.json"
    command = [sys.executable, str(ROOT / "bench" / "serving.py"), "--model", str(ROOT / "demo" / "base"),
               "--configs", "s1:5:4", "--duration", "3", "--grace", "3", "--input-range", "8", "16",
               "--output-range", "8", "16", "--max-num-seqs", "8", "--time-budget", "240",
               "--adapter-root", str(tmp_path / "adapters"), "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| S1 n=5 4 req/s | triton |" in done.stdout and "| S1 n=5 4 req/s | direct |" in done.stdout
    report = json.loads(out.read_text())
    assert [r["path"] for r in report["results"]] == ["triton", "direct"]
    for result in report["results"]:
        summary = result["summary"]
        assert summary["num_errors"] == 0, summary["first_errors"]
        assert summary["num_finished"] == summary["num_sent"] > 0  # 4 req/s is far below the demo's capacity
        assert summary["token_throughput"] > 0 and summary["engine_steps_per_s"] > 0
        assert summary["ttft_ms"]["p50"] > 0 and summary["idle_after"]
        assert summary["adapters"]["adapter_loads"] >= 1
    assert report["targets"]["triton/direct token throughput, s1 n=5 4 req/s"] > 0.8  # below saturation: alike
