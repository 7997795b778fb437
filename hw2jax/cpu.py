"""Facts about the CPU this process runs on: its model name, core count and vector features. The
package's bottom layer: the kernels' build, the dispatch policy and benchmark metadata read it."""

from __future__ import annotations

import os
import platform

# The vector extensions that decide how fast CPU kernels run: 256-bit AVX2, 512-bit AVX-512,
# its bf16 dot products, and Intel's AMX tiles.
VECTOR_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def _cpuinfo_field(name: str, cpuinfo: str) -> str | None:
    try:
        with open(cpuinfo) as f:
            return next(
                (line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() == name),
                None,
            )
    except OSError:
        return None


def cpu_vector_features(cpuinfo: str = "/proc/cpuinfo") -> dict[str, bool]:
    """Which of :data:`VECTOR_FEATURES` this CPU has (Linux's ``/proc/cpuinfo`` flags; all False
    where that file is missing), for benchmark metadata and the dispatch policy."""
    flags = (_cpuinfo_field("flags", cpuinfo) or "").split()
    return {name: name in flags for name in VECTOR_FEATURES}


def cpu_model_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name as the OS reports it (e.g. "AMD EPYC 9654 96-Core Processor")."""
    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine()


def cpu_description() -> dict[str, object]:
    """Model, usable cores and vector features: what every benchmark and run records."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": cpu_model_name(), "cores": cores, "features": cpu_vector_features()}
