"""Where a decode step's time goes: cProfile of engine.step() (host) and torch.profiler (kernels).

    PYTHONPATH=. python tools/profile_step.py [--batch 32] [--lora none|mixed] [--rank 8] [--modules qkvo|all] [--eager]
"""
from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import cProfile
import pstats
import tempfile

import torch

from bench.common import ALL_LINEAR, QKVO, random_adapter, write_model_dir
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lora", default="none", choices=["none", "mixed"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--modules", default="qkvo", choices=["qkvo", "all"])
    ap.add_argument("--eager", action="store_true", help="no decode graphs, so the profile lists each kernel")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=write_model_dir(tempfile.mkdtemp()), load_format="dummy", dtype="float16",
                                    max_num_seqs=256, max_num_batched_tokens=8192, warmup=False,
                                    decode_graphs="off" if args.eager else "auto"))
    runner = engine.runner
    names = [None] * args.batch
    if args.lora == "mixed":
        names = []
        for i in range(args.batch):
            engine.lora.register(f"a{i}", random_adapter(f"a{i}", engine.model_config, args.rank,
                                                         QKVO if args.modules == "qkvo" else ALL_LINEAR, i, runner.page_size,
                                                         runner.dtype, pin_memory=True))
            names.append(f"a{i}")
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i in range(args.batch):
        engine.add(engine.make_sequence(str(i), None, [1] + [7] * 255, params, names[i]))
    for _ in range(20):
        engine.step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(10):
        engine.step()
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
