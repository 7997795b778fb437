"""The CPU's vector features, from the OS. The package's bottom layer: the kernels' build, the
dispatch policy and benchmark metadata read it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time

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


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(cpuinfo: str = "/proc/cpuinfo") -> dict[str, object]:
    """What a measurement ran on, for every benchmark JSON and every run's results: the CPU's
    model name, vendor, family and model numbers (a cloud CPU's name may be only "AMD EPYC";
    family 25 model 17 is then Zen 4), cores, vector features, the versions that matter and the
    date. Versions are read from the installed packages, so nothing is imported."""

    def field(name: str) -> str | None:
        return _cpuinfo_field(name, cpuinfo)

    return {
        "cpu_model": field("model name") or platform.processor() or platform.machine(),
        "cpu_vendor": field("vendor_id"),
        "cpu_family_model": f"{field('cpu family')}/{field('model')}",
        "cpu_count": os.cpu_count(),
        "cpu_features": cpu_vector_features(cpuinfo),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "torch": _version("torch"),
        "date": time.strftime("%Y-%m-%d"),
    }
