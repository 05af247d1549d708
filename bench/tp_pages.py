"""What an adapter costs each rank under tensor parallelism, in pool pages and bytes: the default
mode (A of the column layers whole on every rank) against fully_sharded_loras and against the
ideal 1/N of TP = 1. Packs real adapters of the shapes (one layer: a page holds one block of
every layer, so page counts do not depend on the number of layers); runs on a CPU.

    PYTHONPATH=. python bench/tp_pages.py [--shapes 7b,13b,70b] [--sizes 1,2,4,8]
"""
from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # not bench/ (it shadows engine)

import argparse

import torch

from bench.common import ALL_LINEAR, QKVO, SHAPES, random_adapter
from engine.config import ModelConfig
from engine.parallel import ShardLayout
from engine.sharding import shard_adapter

BLOCK_SIZE = 16


def page_size(config: ModelConfig, size: int) -> int:
    """Elements of one page of rank 0 (one KV block of its KV heads)."""
    return 2 * BLOCK_SIZE * ShardLayout.of(config, 0, size).num_kv_heads * config.head_dim


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="7b,13b,70b")
    ap.add_argument("--sizes", default="1,2,4,8")
    args = ap.parse_args()
    print("| shape | adapter | TP | mode | pages per rank | MiB per rank | x ideal (TP=1 / N) | host MiB, all ranks |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes.split(","):
        config = ModelConfig.from_dict({**SHAPES[shape], "num_hidden_layers": 1})
        for label, rank, modules in (("rank 16 all-linear", 16, ALL_LINEAR), ("rank 8 q,k,v,o", 8, QKVO)):
            single = None
            for size in (int(s) for s in args.sizes.split(",")):
                if config.num_kv_heads % size and size % config.num_kv_heads:
                    continue
                pages = page_size(config, size)
                full = random_adapter("a", config, rank, modules, 0, pages, torch.float16, pin_memory=False)
                for fully_sharded in ((False,) if size == 1 else (False, True)):
                    packed = full if size == 1 else shard_adapter(full, config, size, fully_sharded, pages)
                    per_rank = packed.num_bytes // size
                    if single is None:
                        single = per_rank
                    mode = "-" if size == 1 else ("fully sharded" if fully_sharded else "default")
                    print(f"| {shape} | {label} | {size} | {mode} | {packed.num_pages} | "
                          f"{per_rank * SHAPES[shape]['num_hidden_layers'] / 2**20:.1f} | "
                          f"{per_rank * size / single:.2f} | "
                          f"{packed.num_bytes * SHAPES[shape]['num_hidden_layers'] / 2**20:.1f} |", flush=True)
    print(f"\nfloat16, block_size {BLOCK_SIZE}; pages of rank 0 (its KV heads: a page shrinks with TP until "
          f"one KV head per rank); command: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
