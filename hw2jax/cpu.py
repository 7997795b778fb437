"""The CPU's vector features, from the OS. The package's bottom layer: the kernels' build, the
dispatch policy and benchmark metadata read it."""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

from hw2jax import malloc

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


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask (``taskset``, a container's cpuset),
    which may be fewer than the machine's ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call on this OS
        return os.cpu_count() or 1


# The share of the cores' time that other work may take before figures taken beside it mean
# little: cpu_quick.py will not start beside more.
BUSY_SHARE_LIMIT = 0.25
# A share is read over at least this many clock ticks of the cores (a fifth of a second of two
# cores at Linux's 100 a second): the two readings of /proc/stat and this process's own CPU
# time are rounded to ticks apart, and idle windows of this length read up to 3 ticks busy
# elsewhere (0.07 of them) on the 2-core Zen 4, 20 in 40 reading none.
MIN_SHARE_TICKS = 40
# A block too short for MIN_SHARE_TICKS is read together with what ran before it in this process,
# from a reading taken at most this long before its end (an earlier block's start or end).
LOOKBACK_S = 2.0
# Readings of /proc/stat at blocks' starts and ends, by file and cores: (time, busy, all, own).
_readings: dict[tuple, collections.deque] = collections.defaultdict(
    lambda: collections.deque(maxlen=64)
)


def core_ticks(cores: set[int] | None = None, stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(busy, all) clock ticks that ``cores`` (all the machine's where None) have spent since
    boot, from /proc/stat: busy is all but idle and waiting on I/O (niced work and a virtual
    machine's stolen time slow a timing too); None where it cannot be read."""
    names = {"cpu"} if cores is None else {f"cpu{core}" for core in cores}
    busy = total = 0
    try:
        with open(stat) as f:
            for line in f:
                name, *values = line.split()
                if name in names:
                    # user nice system idle iowait irq softirq steal: later fields (guest
                    # time) are counted in user and nice already.
                    fields = [int(x) for x in values[:8]]
                    total += sum(fields)
                    busy += sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


def _own_ticks() -> float:
    # With its children that have ended: without them, five compiler and Python runs between
    # two classes read as 0.10-0.13 of the cores' time taken by other work.
    times = os.times()
    own = times.user + times.system + times.children_user + times.children_system
    return own * os.sysconf("SC_CLK_TCK")


def _reading(cores: set[int] | None, stat: str) -> tuple[float, int, int, float] | None:
    ticks = core_ticks(cores, stat)
    return None if ticks is None else (time.monotonic(), *ticks, _own_ticks())


@contextlib.contextmanager
def others_busy(stat: str = "/proc/stat"):
    """Yields a dict whose ``"share"``, once the block has run, is the share of this process's
    usable cores' time that other processes took meanwhile: the cores' busy ticks less this
    process's CPU time (all its threads, and its children that have ended), over all their
    ticks. A block shorter than :data:`MIN_SHARE_TICKS` is read from an earlier block's start
    or end in this process, at most :data:`LOOKBACK_S` before (auto's probe times classes one
    after another); None where there is none or /proc/stat cannot be read."""
    try:
        cores = os.sched_getaffinity(0)
    except AttributeError:  # no affinity call on this OS: the machine's cores
        cores = None
    earlier = _readings[(stat, None if cores is None else frozenset(cores))]
    reading: dict[str, float | None] = {"share": None}
    if (start := _reading(cores, stat)) is not None:
        earlier.append(start)
    yield reading
    if (end := _reading(cores, stat)) is None:
        return
    for began in reversed(earlier):  # this block's start, else the latest far enough back
        if start is not None and began[0] > start[0]:
            continue  # inside this block (a block within it)
        if began is not start and end[0] - began[0] > LOOKBACK_S:
            break  # the lookback is for blocks too short: a long one reads from its own start
        if (ticks := end[2] - began[2]) >= MIN_SHARE_TICKS:
            others = end[1] - began[1] - (end[3] - began[3])
            reading["share"] = min(max(others / ticks, 0.0), 1.0)
            break
    earlier.append(end)


def cpu_vector_features(cpuinfo: str = "/proc/cpuinfo") -> dict[str, bool]:
    """Which of :data:`VECTOR_FEATURES` this CPU has (Linux's ``/proc/cpuinfo`` flags; all False
    where that file is missing), for benchmark metadata and the dispatch policy."""
    flags = (_cpuinfo_field("flags", cpuinfo) or "").split()
    return {name: name in flags for name in VECTOR_FEATURES}


def native_bf16(backend: str, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether bf16 matrix products run natively: on a GPU or TPU (``backend`` is jax's), or on a
    CPU with AVX512-BF16 or AMX-BF16; elsewhere bf16 is emulated and only adds conversions."""
    if backend != "cpu":
        return True
    features = cpu_vector_features(cpuinfo)
    return features["avx512_bf16"] or features["amx_bf16"]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# Environment variables that change the figures without changing the code: glibc's allocator
# (MALLOC_*, benchmarks/NOTES.md), OpenMP's wait policy (torch's threads), XLA's flags, oneDNN's
# (torch's products), and hw2jax's own path settings and kernel build target.
_SETTINGS_PREFIXES = (
    "MALLOC_",
    "GLIBC_TUNABLES",
    "OMP_",
    "KMP_",
    "XLA_FLAGS",
    "ONEDNN_",
    "DNNL_",
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "HW2JAX_ATTENTION",
    "HW2JAX_MATMUL",
    "HW2JAX_ROW_KERNELS",
    "HW2JAX_RECURRENCE",
    "HW2JAX_AUTO",
    "HW2JAX_KERNEL_MARCH",
)


# Of those, the settings that make this CPU's libraries (and our kernels' build) use fewer
# instruction sets than it has: a run with them stands in for another CPU.
_ISA_LIMITS = (
    "HW2JAX_KERNEL_MARCH",
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
)


def instruction_sets_held_back(env: dict[str, str]) -> list[str]:
    """The settings in a record's ``env`` (:func:`runtime_settings`) that hold instruction sets
    back, as ``NAME=value``, and XLA's ``--xla_cpu_max_isa`` flag where it is set."""
    found = [f"{name}={env[name]}" for name in _ISA_LIMITS if name in env]
    return found + [flag for flag in env.get("XLA_FLAGS", "").split() if "max_isa" in flag]


@functools.cache
def source_commit(package: Path = Path(__file__).parent) -> str | None:
    """The commit of the checkout this package runs from, with "+changes" where tracked files
    differ from it; None where the package is not a checkout's own folder (an installed wheel,
    even one inside another project's repository) or git cannot be run."""
    run = functools.partial(subprocess.run, cwd=package, capture_output=True, text=True)
    try:
        top = run(["git", "rev-parse", "--show-toplevel"])
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != package.parent.resolve():
            return None
        head = run(["git", "rev-parse", "--short", "HEAD"])
        changed = run(["git", "status", "--porcelain", "--untracked-files=no"])
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def runtime_settings() -> dict[str, str]:
    """The environment variables set for this process that are known to move timings or
    numbers, for :func:`machine`'s record, so that two runs can be told apart later."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(_SETTINGS_PREFIXES)}


def machine(cpuinfo: str = "/proc/cpuinfo") -> dict[str, object]:
    """What a measurement ran on, for every benchmark JSON and every run's results: the CPU's
    model name, vendor, family and model numbers (a cloud CPU's name may be only "AMD EPYC";
    family 25 model 17 is then Zen 4), its cores and those this process may use, vector
    features, the versions that matter, the code's commit (:func:`source_commit`), whether
    malloc keeps freed memory (:mod:`hw2jax.malloc`), the settings that move timings or numbers
    (:func:`runtime_settings`: a kernel build target, a forced path, XLA's flags) and the date.
    Versions are read from the installed packages, so nothing is imported."""

    def field(name: str) -> str | None:
        return _cpuinfo_field(name, cpuinfo)

    family, model = field("cpu family"), field("model")
    return {
        "cpu_model": field("model name") or platform.processor() or platform.machine(),
        "cpu_vendor": field("vendor_id"),
        "cpu_family_model": f"{family}/{model}" if family and model else None,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cpu_features": cpu_vector_features(cpuinfo),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "torch": _version("torch"),
        "commit": source_commit(),
        "malloc": malloc.state(),
        "env": runtime_settings(),
        "date": time.strftime("%Y-%m-%d"),
    }


def peak_fp32_gflops(cpuinfo: str = "/proc/cpuinfo") -> dict[str, object]:
    """An estimate of the CPU's float32 peak, for "achieved against peak" in benchmarks: cores x
    clock x FMA lanes x 2. The clock is /proc/cpuinfo's "cpu MHz" (under a hypervisor usually
    the nominal clock; boost can exceed it). FLOPs per cycle per core, fused multiply-adds:
    AMD Zen 2 to Zen 4 and Intel with AVX2 alone: two 256-bit units, 32 (Zen 4 runs AVX-512 as
    two 256-bit halves); Zen and Zen+ (family 23 below model 49): 16; Intel with AVX-512: two
    512-bit units, 64 (some Xeons have one, 32); Zen 5: 64; anything else: unknown (None)."""
    vendor, family = _cpuinfo_field("vendor_id", cpuinfo), _cpuinfo_field("cpu family", cpuinfo)
    mhz = _cpuinfo_field("cpu MHz", cpuinfo)
    features = cpu_vector_features(cpuinfo)
    per_cycle = None
    model = int(_cpuinfo_field("model", cpuinfo) or 0)
    if vendor == "AuthenticAMD" and family in ("23", "25"):
        per_cycle = 16 if family == "23" and model < 49 else 32
    elif vendor == "AuthenticAMD" and family == "26":
        per_cycle = 64
    elif vendor == "GenuineIntel":
        per_cycle = 64 if features["avx512f"] else 32 if features["avx2"] else None
    cores = usable_cores()
    ghz = float(mhz) / 1e3 if mhz else None
    peak = cores * ghz * per_cycle if per_cycle and ghz else None
    return {"cores": cores, "ghz": ghz, "flops_per_cycle_per_core": per_cycle, "gflops": peak}
