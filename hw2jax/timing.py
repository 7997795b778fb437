"""Wall-clock timing shared by `hw2jax theory` and the benchmarks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np


def median_seconds(call: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``call()`` after one warm-up call (which also compiles under jit).
    ``call`` must wait for its work to finish, e.g. with ``block_until_ready``."""
    return interleaved_seconds({"call": call}, repeats)["call"][1]


def interleaved_seconds(
    calls: dict[str, Callable[[], object]], repeats: int = 5
) -> dict[str, tuple[list[float], float]]:
    """Times several calls in turn, round after round (a b a b ...), after one warm-up call
    each: on a shared machine a slow patch then hits every contender alike instead of
    whichever ran during it. Returns {name: (seconds of each timed call, median)}."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: (t, float(np.median(t))) for name, t in times.items()}


# Environment variables that change the figures without changing the code: glibc's allocator
# (MALLOC_MMAP_THRESHOLD_ moved torch's MiniLM forward by 25 % and ours by up to 40 % on the
# project's machine, benchmarks/README.md), OpenMP's wait policy (torch's threads), XLA's flags.
_TIMING_ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "OMP_", "KMP_", "XLA_FLAGS")


# The vector extensions that decide how fast CPU kernels run: 256-bit AVX2, 512-bit AVX-512,
# its bf16 dot products, and Intel's AMX tiles.
VECTOR_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_vector_features(cpuinfo: str = "/proc/cpuinfo") -> dict[str, bool]:
    """Which of :data:`VECTOR_FEATURES` this CPU has (Linux's ``/proc/cpuinfo`` flags; all False
    where that file is missing), for benchmark metadata and the fused kernel's ``auto`` rule."""
    try:
        with open(cpuinfo) as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        flags = []
    return {name: name in flags for name in VECTOR_FEATURES}


def runtime_settings() -> dict[str, str]:
    """The environment variables set for this process that are known to move timings, for a
    benchmark's JSON, so that two runs can be told apart later."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(_TIMING_ENV_PREFIXES)}


def torch_peer_device() -> str:
    """Where a torch peer of a benchmark runs: on the GPU when jax runs on one and torch sees
    CUDA (a CPU peer would make any GPU ratio meaningless), else on the CPU."""
    import jax
    import torch

    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        # JAX computes float32 matmuls with TF32 on recent NVIDIA GPUs by default; torch does not.
        torch.set_float32_matmul_precision("high")  # TF32 too, so both do the same arithmetic
        return "cuda"
    return "cpu"


def torch_synchronize(device: str) -> None:
    """Waits for torch's queued GPU work; CUDA calls return before their kernels finish."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
