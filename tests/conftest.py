import os
import sys

# One intra-op thread: on a 2-core machine shared with tritonserver, torch's OpenMP pool
# spins against itself and small CPU ops get hundreds of times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(1)

# Without CUDA the Triton kernels run in the interpreter. Triton reads TRITON_INTERPRET when a
# @triton.jit function is defined, and other tests' imports (torch, transformers) may load Triton
# first: set it here, before any test module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
