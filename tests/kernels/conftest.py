"""Kernel tests: without CUDA, run the Triton kernels in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, which is why it happens here,
before pytest imports the test modules.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
