"""Wall-clock timing shared by `hw2jax theory` and the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def median_seconds(call: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``call()`` after one warm-up call (which also compiles under jit).
    ``call`` must wait for its work to finish, e.g. with ``block_until_ready``."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
