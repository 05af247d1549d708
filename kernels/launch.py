"""Programmatic dependent launch (PDL, CUDA devices of compute capability 9.0 on).

A kernel launched with it (``launch_pdl=True``) may start while the kernel before it in its stream
still runs: as soon as every program of that kernel has called gdc_launch_dependents() or ended. Its
programs then wait in gdc_wait() until that kernel has finished and its writes are visible. What a
kernel reads before its wait must therefore not be written by the kernel before it; the kernels here
wait before any load or store of their tensors, except lora_expand, which gathers its tables first
(kernels/lora_expand.py says why that is safe). What PDL changes is when a kernel starts, never what
it computes: the interpreter has no such instructions, so CPU runs launch without it.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # grid dependency control: Triton 3.3 on
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: pdl_supported() is False, no kernel calls them
    gdc_launch_dependents = gdc_wait = None


@functools.lru_cache(maxsize=None)
def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` may be launched with programmatic dependent launch: a CUDA device
    of compute capability 9.0 or more and a Triton with grid dependency control."""
    return (device.type == "cuda" and gdc_wait is not None
            and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """The start of a kernel launched with PDL that touches no tensor before its wait: let the next kernel
    start, then wait for the one before to finish."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
