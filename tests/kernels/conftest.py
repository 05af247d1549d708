"""Kernel tests: without CUDA, run the Triton kernels in the interpreter on CPU tensors.

Triton reads TRITON_INTERPRET when a @triton.jit function is defined, i.e. when a kernel module
is imported: so it is set here, before pytest imports the test modules.
"""
import os
import sys

import torch

KERNEL_MODULES = ("kernels.lora_shrink", "kernels.lora_expand", "kernels.lora_fused", "kernels.paged_attention",
                  "kernels.prefill_attention", "kernels.lora_common", "kernels.attention_common", "kernels.elementwise",
                  "kernels.launch")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    early = [m for m in KERNEL_MODULES if m in sys.modules]
    if early:
        raise RuntimeError(f"{early} were imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
                           "set TRITON_INTERPRET=1 in the environment to run the kernel tests on CPU")
    os.environ["TRITON_INTERPRET"] = "1"
