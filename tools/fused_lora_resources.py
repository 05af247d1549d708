"""Registers, spills and shared memory of lora_fused's sm_90 binaries, compiled here without a GPU.

For every tile class kernels/tiles.py can choose (token class x rank class) and the Llama-7B
projection groups, compile the kernel ahead of time for sm_90 (Triton's own LLVM and ptxas) and
read the cubin's resource usage with cuobjdump; the figures of docs/KERNELS.md's fused tile table.

    python tools/fused_lora_resources.py [--dtype fp16|bf16|fp32] [--page 131072]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402

from kernels import tiles  # noqa: E402
from kernels.lora_common import vec_width  # noqa: E402
from kernels.lora_fused import _lora_fused_kernel  # noqa: E402
from tools.sm90_binary import compile_sm90, registers  # noqa: E402

# (K, projections, largest N) of Llama-7B's projection groups
GROUPS = {"qkv": (4096, 3, 4096), "o": (4096, 1, 4096), "gate_up": (4096, 2, 11008), "down": (11008, 1, 4096)}
DIVISIBLE = ("K", "max_n", "N0", "N1", "N2", "OFF1", "OFF2", "layer_offset", "page_stride", "x_stride_t",
             "y_stride_t")


def resources(dtype: str, page: int, group: str, block_m: int, rank: int) -> str:
    k, num_proj, max_n = GROUPS[group]
    cfg = tiles.fused_tiles(1, k, max_n, num_proj, rank, page, block_m, 132)
    constexprs = dict(NPROJ=num_proj, PROJ_BASE=0, NUM_LOCAL=num_proj, PAGE=page, VEC_A=vec_width(k, page),
                      VEC_B=vec_width(page, max_n), BLOCK_M=block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
                      BLOCK_R=tiles.expand_block_r(rank), SMALL_BLOCK_K=cfg.small_block_k,
                      SMALL_BLOCK_N=cfg.small_block_n, COL_BLOCK=max(cfg.block_n, cfg.small_block_n),
                      A_IN_TWO_PAGES=k <= page, B_IN_TWO_PAGES=max_n <= page,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    kernel = compile_sm90(_lora_fused_kernel, constexprs, dtype, DIVISIBLE, cfg.num_warps, cfg.num_stages)
    line = registers(kernel)
    return (f"| {group} | {block_m} | {constexprs['BLOCK_R']} | {cfg.block_k} x {cfg.block_n} | {cfg.num_warps} | "
            f"{cfg.num_stages} | {line} | {kernel.metadata.shared // 1024} kB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--page", type=int, default=2 * 16 * 32 * 128, help="pool page in elements (Llama-7B's)")
    parser.add_argument("--ranks", default="16,32,64,128,256")
    args = parser.parse_args()
    print(f"lora_fused, sm_90, {args.dtype}, page {args.page}, triton {triton.__version__}\n")
    print("| group | BLOCK_M | BLOCK_R | BLOCK_K x BLOCK_N | warps | stages | registers, spill stack | shared |")
    print("| --- | ---: | ---: | --- | ---: | ---: | --- | ---: |")
    for block_m in (16, 64):
        for rank in (int(r) for r in args.ranks.split(",")):
            for group in GROUPS:
                print(resources(args.dtype, args.page, group, block_m, rank), flush=True)


if __name__ == "__main__":
    main()
