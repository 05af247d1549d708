"""Compile a Triton kernel of kernels/ ahead of time for sm_90 on a machine without a GPU (Triton's own
LLVM and ptxas), and read what its binary holds: registers and spills (cuobjdump), shared memory, PTX.

Used by tools/fused_lora_resources.py (the fused kernel's resource table) and by
tests/unit/test_sm90_binaries.py, which compiles decode kernels as the H200 runs them: the
interpreter that runs them in CI never compiles them, so it cannot catch what only the compiler rejects.

    python tools/sm90_binary.py [fp16|bf16|fp32]   # decode binaries: registers, shared memory, PTX facts as JSON
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import tiles  # noqa: E402
from kernels.lora_common import vec_width  # noqa: E402

# the LoRA kernels' integer tables; other pointers take the pool's dtype
POINTERS = {"sorted_ids_ptr": "*i32", "tile_starts_ptr": "*i32", "tile_lens_ptr": "*i32", "tile_slots_ptr": "*i32",
            "num_lora_tiles_ptr": "*i32", "page_tables_ptr": "*i32", "ranks_ptr": "*i32", "a_offsets_ptr": "*i64",
            "b_offsets_ptr": "*i64", "scales_ptr": "*fp32", "z_ptr": "*fp32", "z_next_ptr": "*fp32",
            "part_acc_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "seq_lens_ptr": "*i32",
            "query_start_loc_ptr": "*i32", "block_tables_ptr": "*i32"}
# float scalars; other scalars are i32
FLOATS = ("eps", "qk_scale")


def compile_sm90(fn, constexprs: dict, dtype: str, divisible: tuple = (), num_warps: int = 4, num_stages: int = 3,
                 launch_pdl: bool = False):
    """fn's sm_90 binary for these constexprs: pointers 16-byte aligned, scalars i32 (FLOATS fp32; those
    named in ``divisible`` multiples of 16, as Triton specializes them at run time)."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTERS.get(name, f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
            if name in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 64),
                          options=dict(num_warps=num_warps, num_stages=num_stages, launch_pdl=launch_pdl))


def registers(kernel) -> str:
    """cuobjdump's resource line of the binary, e.g. 'REG:128 STACK:0'."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    return next((entry.split("SHARED")[0].strip() for entry in usage.splitlines() if "REG:" in entry), "?")


def ptx_order(ptx: str) -> dict:
    """Where, in the PTX's text order, the grid dependency instructions sit among the global memory ones."""
    lines = ptx.splitlines()

    def where(pattern: str) -> list[int]:
        return [i for i, line in enumerate(lines) if re.search(pattern, line)]
    return {"wait": where(r"griddepcontrol\.wait"), "launch_dependents": where(r"griddepcontrol\.launch_dependents"),
            "loads": where(r"\bld\.global|\bcp\.async"), "stores": where(r"\bst\.global|\batom\.|\bred\.")}


# Llama-7B's decode graphs at batch 64 over 64 rank-16 adapters: the gate_up group (K 4,096, N 2 x 11,008)
K, NS, NPROJ, PAGE = 4096, (11008, 11008), 2, 2 * 16 * 32 * 128
DIVISIBLE = ("K", "N0", "N1", "OFF1", "layer_offset", "page_stride", "x_stride_t", "y_stride_t", "cols_per_program")


def decode_binaries(dtype: str = "fp16") -> dict:
    """The decode binaries of lora_shrink and lora_expand (BLOCK_M 16, rank class 16, the expand storing
    the deferred delta into the other z's zeros), of the residual add + RMSNorm and of decode attention
    (Llama-7B: hidden 4,096; 32 heads of 128, 32 KV heads, 16-token blocks), launched with programmatic
    dependent launch."""
    from kernels.elementwise import _add_rms_norm_kernel
    from kernels.lora_expand import _lora_expand_kernel
    from kernels.lora_shrink import _lora_shrink_kernel
    from kernels.paged_attention import _decode_attention_kernel
    precision = "ieee" if dtype == "fp32" else "tf32"
    shrink_cfg = tiles.shrink_tiles(64, K, 16, NPROJ, PAGE, 16, 132)
    shrink = compile_sm90(_lora_shrink_kernel, dict(
        NPROJ=NPROJ, PAGE=PAGE, VEC=vec_width(K, PAGE), BLOCK_M=16, BLOCK_K=shrink_cfg.block_k,
        BLOCK_R=shrink_cfg.block_r, ROW_IN_TWO_PAGES=K <= PAGE, DOT_PRECISION=precision, LAUNCH_DEPENDENTS=True),
        dtype, DIVISIBLE, shrink_cfg.num_warps, shrink_cfg.num_stages)
    expand_cfg = tiles.expand_tiles(64, max(NS), NPROJ, PAGE, 16, 132, accumulate=False)
    expand = compile_sm90(_lora_expand_kernel, dict(
        NPROJ=NPROJ, PROJ_BASE=0, PAGE=PAGE, VEC=vec_width(PAGE, *NS), BLOCK_M=16, BLOCK_N=expand_cfg.block_n,
        BLOCK_R=tiles.expand_block_r(16), ROW_IN_TWO_PAGES=max(NS) <= PAGE, DOT_PRECISION=precision,
        ACCUMULATE=False, ZERO_NEXT=True, WAIT_PRIOR=True),
        dtype, DIVISIBLE, expand_cfg.num_warps, expand_cfg.num_stages, launch_pdl=True)
    norm = compile_sm90(_add_rms_norm_kernel, dict(HAS_RESIDUAL=True, HAS_DELTA=True, BLOCK_H=4096, PDL=True),
                        dtype, num_warps=tiles.elementwise_warps(4096), num_stages=1, launch_pdl=True)
    attention_cfg = tiles.decode_attention_tiles(64, 32, 256, 128, 132)
    attention = compile_sm90(_decode_attention_kernel, dict(
        NUM_HEADS=32, GROUP=1, HEAD_DIM=128, BS=16, NUM_SPLITS=attention_cfg.num_splits, BLOCK_G=tiles.MIN_DOT,
        BLOCK_D=128, BLOCK_N=attention_cfg.block_n, DOT_PRECISION=precision, PDL=True),
        dtype, num_warps=attention_cfg.num_warps, num_stages=attention_cfg.num_stages, launch_pdl=True)
    return {name: {"registers": registers(k), "shared": k.metadata.shared, "launch_pdl": k.metadata.launch_pdl,
                   **ptx_order(k.asm["ptx"])}
            for name, k in (("shrink", shrink), ("expand", expand), ("add_rms_norm", norm), ("attention", attention))}


if __name__ == "__main__":
    print(json.dumps(decode_binaries(sys.argv[1] if len(sys.argv) > 1 else "fp16")))
