"""bench/engine.py --tensor-parallel-size runs (on a CPU at the tiny shape, gloo): one row per
case with a step time, the floor of one rank's shard, and the configuration in its JSON."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_engine_benchmark_at_tp2_on_cpu(tmp_path):
    out = tmp_path / "tp2.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "engine.py"), "--shape", "tiny",
                           "--tensor-parallel-size", "2", "--fully-sharded-loras", "--batches", "2",
                           "--context", "8", "--steps", "1", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tensor_parallel_size"] == 2 and report["fully_sharded_loras"] and report["shape"] == "tiny"
    assert report["startup_s"] > 0 and f"engine start-up {report['startup_s']:.1f} s" in done.stdout
    cases = [row["case"] for row in report["rows"]]
    assert cases == ["LoRA off", "1 adapter, rank 8 q,k,v,o", "2 adapters, rank 8 q,k,v,o",
                     "1 adapter, rank 16 all-linear", "2 adapters, rank 16 all-linear"]
    for row in report["rows"]:
        # the fraction is floor / seconds, the milliseconds are each times 1e3: equal up to rounding
        assert row["step_ms"] > 0 and 0 < row["floor_ms"]
        assert row["frac_of_floor"] == pytest.approx(row["floor_ms"] / row["step_ms"], rel=1e-12)
    assert "cpu x 2 (shape tiny, LoRA sharding fully sharded)" in done.stdout
