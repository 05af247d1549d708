"""bench/bandwidth.py: the copy bandwidth that the benchmarks' floors divide by is measured, not assumed."""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.bandwidth import copy_bandwidth  # noqa: E402


def test_copy_bandwidth_is_measured_on_the_device_given():
    small = copy_bandwidth("cpu", 1 << 20, 3)
    assert math.isfinite(small) and small > 1e8  # any machine copies 1 MiB faster than 100 MB/s
    assert copy_bandwidth("cpu", 1 << 20, 3) is small  # once per process (cached)
    assert copy_bandwidth("cpu", 1 << 21, 3) != small  # another size is another measurement
