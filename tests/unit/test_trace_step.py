"""tools/trace_step.py's summary of a Chrome trace: kernel time by class per step, the GPU span, and
each stream's busy time as the union of its kernels' intervals (overlaps counted once)."""
import gzip
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("trace_step", os.path.join(ROOT, "tools", "trace_step.py"))
trace_step = importlib.util.module_from_spec(spec)
saved_path = list(sys.path)  # the script points sys.path[0] at the repository root, as a script needs
spec.loader.exec_module(trace_step)
sys.path[:] = saved_path


def kernel(name, ts, dur, stream):
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_summary_of_two_steps_on_two_streams(tmp_path):
    events = [
        kernel("nvjet_sm90_hsh_64x32", 0, 10, 7), kernel("_lora_shrink_kernel", 2, 4, 9),
        kernel("_lora_expand_kernel", 5, 4, 9),  # overlaps the shrink by 1: stream 9 busy 7, not 8
        kernel("_decode_attention_kernel", 12, 6, 7),
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 20, "dur": 2, "args": {"stream": 7}},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},  # host events are not kernels
        kernel("nvjet_sm90_hsh_64x32", 40, 10, 7), kernel("_rms_norm_kernel", 52, 2, 7),
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = trace_step.summarize(str(path), steps=2)
    assert summary["span_us"] == 54 / 2 and summary["kernels"] == 7 / 2
    assert summary["by_class_us"] == {"gemm": 10.0, "attention": 3.0, "shrink": 2.0, "expand": 2.0,
                                      "gpu_memcpy": 1.0, "elementwise": 1.0}
    assert summary["stream_busy_us"] == {"7": (10 + 6 + 2 + 10 + 2) / 2, "9": 7 / 2}


def test_a_trace_without_kernels_says_so(tmp_path):
    path = tmp_path / "empty.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": [{"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1}]}, f)
    assert "error" in trace_step.summarize(str(path), steps=1)
