"""The copy bandwidth of the device the benchmarks run on, measured in the same run: the ceiling
every "fraction of the floor" divides by (4.29 TB/s on an H200, 3.02 on an H100; never a constant)."""
from __future__ import annotations

import functools
import statistics
import time

import torch


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str = "cuda", num_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy of ``num_bytes`` (median of
    ``repeats``; CUDA events on a GPU, the wall clock on a CPU). Measured once per process."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    times = []
    for _ in range(repeats):
        if src.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    return 2 * num_bytes / statistics.median(times)
