"""The CPU's vector features, from the OS. The package's bottom layer: the kernels' build, the
dispatch policy and benchmark metadata read it."""

from __future__ import annotations

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
