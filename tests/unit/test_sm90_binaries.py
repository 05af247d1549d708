"""Decode kernels compiled for sm_90 as the H200 runs them (tools/sm90_binary.py, here without a
GPU): the interpreter that runs them in CI never compiles them, so what only the compiler rejects (a
type that differs between two branches, a register spill) would reach the GPU machine first.

Each is also checked for its programmatic dependent launch (kernels/launch.py): the shrink lets the next
kernel start after its loop, before it writes z; the expand, launched with the attribute, gathers its tables before
its one wait and writes nothing before it (z and y are the shrink's and the step's); the RMSNorm and
decode attention wait before they read or write any tensor."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# the serving dtypes; in float32 (the test dtype of the GPU tiers) decode attention spills 632 bytes a thread
# with or without PDL (Triton 3.9, 255 registers), which these binaries must not
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_decode_binaries(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "sm90_binary.py"), dtype], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    binaries = json.loads(out.stdout.strip().splitlines()[-1])
    for name, b in binaries.items():
        assert b["registers"].endswith("STACK:0"), f"{name} spills: {b['registers']}"
        assert b["loads"] and b["stores"], name
    shrink, expand = binaries["shrink"], binaries["expand"]
    assert not shrink["launch_pdl"] and not shrink["wait"]
    assert len(shrink["launch_dependents"]) == 1
    assert min(shrink["loads"]) < shrink["launch_dependents"][0] < min(shrink["stores"])  # after the loop, before z
    assert expand["launch_pdl"] and not expand["launch_dependents"]
    assert len(expand["wait"]) == 1
    wait = expand["wait"][0]
    assert min(expand["stores"]) > wait  # z_next's zeros and the delta only after the shrink's end
    early = [i for i in expand["loads"] if i < wait]
    assert 0 < len(early) < len(expand["loads"])  # the tables and page ids before, z and B after
    for name in ("add_rms_norm", "attention"):
        b = binaries[name]
        assert b["launch_pdl"] and len(b["wait"]) == 1 and len(b["launch_dependents"]) == 1, name
        assert b["wait"][0] < min(b["loads"] + b["stores"]), f"{name} touches memory before its wait"
