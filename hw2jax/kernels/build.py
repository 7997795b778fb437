"""Building and loading the fused CPU kernels: their C++ sources (``native/``, one file per kind
of op) ship with the package and are compiled on first use with the system's C++ compiler
(``$CXX``, else ``c++``/``g++``/``clang++``) for this CPU (``-march=native``), one file per core at
a time, and linked into one library in ``$HW2JAX_KERNEL_CACHE`` (default
``~/.cache/hw2jax/kernels``; the objects are kept in its ``objects/``, each keyed by its own
inputs; a build drops libraries and objects unused for :data:`CACHE_KEEP_DAYS`); then its FFI
targets are registered with XLA."""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from hw2jax import cpu
from hw2jax.errors import Hw2jaxError

NATIVE_DIR = Path(__file__).with_name("native")
# FFI targets: (symbol in the library, name registered with XLA).
TARGETS = {
    "attention": ("Hw2jaxCpuAttention", "hw2jax_cpu_attention"),
    "attention_with_biases": (
        "Hw2jaxCpuAttentionWithBiases",
        "hw2jax_cpu_attention_with_biases",
    ),
    "flash_forward": ("Hw2jaxCpuFlashForward", "hw2jax_cpu_flash_forward"),
    "flash_backward": ("Hw2jaxCpuFlashBackward", "hw2jax_cpu_flash_backward"),
    "linear_forward": ("Hw2jaxCpuLinearForward", "hw2jax_cpu_linear_forward"),
    "linear_backward": ("Hw2jaxCpuLinearBackward", "hw2jax_cpu_linear_backward"),
    "dense_forward": ("Hw2jaxCpuDenseLinearForward", "hw2jax_cpu_dense_linear_forward"),
    "dense_backward": ("Hw2jaxCpuDenseLinearBackward", "hw2jax_cpu_dense_linear_backward"),
    "amx_matmul": ("Hw2jaxCpuAmxMatmul", "hw2jax_cpu_amx_matmul"),
    "amx_matmul_bf16": ("Hw2jaxCpuAmxMatmulBf16", "hw2jax_cpu_amx_matmul_bf16"),
    "amx_dense": ("Hw2jaxCpuAmxDense", "hw2jax_cpu_amx_dense"),
    "amx_dense_bf16": ("Hw2jaxCpuAmxDenseBf16", "hw2jax_cpu_amx_dense_bf16"),
    "amx_dense_bf16_weights": (
        "Hw2jaxCpuAmxDenseBf16Weights",
        "hw2jax_cpu_amx_dense_bf16_weights",
    ),
    "amx_dense_bf16_weights_bf16": (
        "Hw2jaxCpuAmxDenseBf16WeightsBf16",
        "hw2jax_cpu_amx_dense_bf16_weights_bf16",
    ),
    "amx_attention": ("Hw2jaxCpuAmxAttention", "hw2jax_cpu_amx_attention"),
    "amx_attention_bf16": ("Hw2jaxCpuAmxAttentionBf16", "hw2jax_cpu_amx_attention_bf16"),
    "few_keys_forward": ("Hw2jaxCpuFewKeysForward", "hw2jax_cpu_few_keys_forward"),
    "few_keys_backward": ("Hw2jaxCpuFewKeysBackward", "hw2jax_cpu_few_keys_backward"),
    "layer_norm_forward": ("Hw2jaxCpuLayerNormForward", "hw2jax_cpu_layer_norm_forward"),
    "layer_norm_forward_bf16": (
        "Hw2jaxCpuLayerNormForwardBf16",
        "hw2jax_cpu_layer_norm_forward_bf16",
    ),
    "add_layer_norm_forward": (
        "Hw2jaxCpuAddLayerNormForward",
        "hw2jax_cpu_add_layer_norm_forward",
    ),
    "layer_norm_backward": ("Hw2jaxCpuLayerNormBackward", "hw2jax_cpu_layer_norm_backward"),
    "bias_gelu": ("Hw2jaxCpuBiasGelu", "hw2jax_cpu_bias_gelu"),
    "float32_dense": ("Hw2jaxCpuFloat32Dense", "hw2jax_cpu_float32_dense"),
    "fma_peak": ("Hw2jaxCpuFmaPeak", "hw2jax_cpu_fma_peak"),
    "gru_forward": ("Hw2jaxCpuGruForward", "hw2jax_cpu_gru_forward"),
    "gru_forward_save": ("Hw2jaxCpuGruForwardSave", "hw2jax_cpu_gru_forward_save"),
    "gru_backward": ("Hw2jaxCpuGruBackward", "hw2jax_cpu_gru_backward"),
}
SUPPORTED_HEAD_DIMS = tuple(range(16, 129, 16))  # the kernel's compiled variants


class KernelUnavailable(Hw2jaxError, RuntimeError):
    """The native kernel could not be built or loaded here; the message says why and what to do."""


def cache_dir() -> Path:
    """Where built kernels are kept: ``$HW2JAX_KERNEL_CACHE``, else ``hw2jax/kernels`` under
    ``$XDG_CACHE_HOME`` (default ``~/.cache``)."""
    if os.environ.get("HW2JAX_KERNEL_CACHE"):
        return Path(os.environ["HW2JAX_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hw2jax" / "kernels"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise KernelUnavailable(
        "no C++ compiler found for the fused CPU attention kernel: install one (Debian/Ubuntu: "
        "apt-get install g++) or set $CXX, or pass implementation='xla' to use XLA's attention."
    )


def _cpu_identity() -> str:
    """-march=native code must not run on another CPU: the cache key names this one."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def build_march() -> str:
    """The kernel's build target: ``$HW2JAX_KERNEL_MARCH`` (e.g. ``x86-64-v3``, AVX2 without
    AVX-512, to check a build for other CPUs on this one), else ``native``."""
    return os.environ.get("HW2JAX_KERNEL_MARCH") or "native"


@functools.cache
def _target_features(cxx: str, march: str) -> dict[str, bool]:
    """The vector features the compiler enables for ``-march=march`` (its predefined macros)."""
    macros = subprocess.run(
        [cxx, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
        capture_output=True,
        text=True,
    ).stdout
    names = {"avx2": "__AVX2__", "avx512f": "__AVX512F__", "avx512_bf16": "__AVX512BF16__"}
    names |= {"amx_tile": "__AMX_TILE__", "amx_bf16": "__AMX_BF16__"}
    return {feature: f"#define {macro} " in macros for feature, macro in names.items()}


def kernel_vector_features() -> dict[str, bool]:
    """The vector features the kernel is built for: the CPU's own under the default
    ``-march=native``, those of ``$HW2JAX_KERNEL_MARCH`` (and of this CPU) otherwise."""
    features = cpu.cpu_vector_features()
    if build_march() == "native":
        return features
    target = _target_features(_compiler(), build_march())
    return {name: has and target.get(name, False) for name, has in features.items()}


def library_target() -> Path:
    """Where the library for this CPU, compiler, jax and source is (or will be) cached."""
    key = hashlib.sha256(
        b"\0".join(
            s.encode()
            for s in (
                _compiler_version(_compiler()),
                jax.__version__,
                _cpu_identity(),
                build_march(),
            )
        )
        + b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in _native("*.cc", "*.h"))
        + _headers_digest()
    ).hexdigest()[:16]
    return cache_dir() / f"cpu_attention-{key}.so"


@functools.cache
def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout


def _native(*patterns: str) -> list[Path]:
    """The kernels' C++ files matching ``patterns``, in a fixed order."""
    return sorted(path for pattern in patterns for path in NATIVE_DIR.glob(pattern))


def _headers_digest() -> bytes:
    """The XLA FFI headers the library is built against, by content rather than by path: a new
    virtual environment with the same jax reuses the library built for another."""
    root = Path(jax.ffi.include_dir())
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.digest()


# A build drops cached libraries and objects that no process has used for this long: each
# source change leaves a library of about 1.2 MB and its changed objects behind.
CACHE_KEEP_DAYS = 30


@functools.cache
def library_path() -> Path:
    """The built library for this CPU, compiler and jax (built on the first call)."""
    cxx = _compiler()
    include = jax.ffi.include_dir()
    target = library_target()
    if target.exists():
        _touch(target)  # in use: kept by the next build's pruning
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A first run otherwise sits still for the build's tens of seconds, saying nothing.
    print(
        f"hw2jax: building the C++ kernels for this CPU into {target.parent} (once per CPU, "
        "compiler and jax; tens of seconds)",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    # Compile to a temporary name and rename: a concurrent or interrupted build never leaves a
    # half-written library under the final name.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        for arch in ([f"-march={build_march()}"], []):  # some compilers/CPUs lack -march=native
            errors = _compile_and_link(cxx, arch, include, built)
            if errors is None:
                os.replace(built, target)
                _prune_cache()
                seconds = time.perf_counter() - start
                print(f"hw2jax: kernels built in {seconds:.0f} s", file=sys.stderr, flush=True)
                return target
    raise KernelUnavailable(
        f"building the fused CPU kernels with {cxx} failed:\n{errors[-2000:]}\n"
        "Pass implementation='xla' to use XLA's attention instead."
    )


def _compile_and_link(cxx: str, arch: list[str], include: str, built: Path) -> str | None:
    """Compiles each source file that has no cached object yet (up to one compiler per core:
    each file takes seconds at -O3), then links the objects into ``built``; None on success,
    else the compiler's errors. Objects are cached by their own inputs, so a change to one
    source compiles that file alone."""
    flags = [cxx, "-O3", "-std=c++17", "-fPIC", *arch]

    def run(command: list[str]) -> str | None:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            return None
        return done.stderr or f"{command[0]} exited with status {done.returncode}"

    def compile_into_cache(source: Path) -> str | None:
        fresh = built.with_name(f"{source.stem}.o")
        errors = run([*flags, "-isystem", include, "-c", str(source), "-o", str(fresh)])
        if errors is None:
            os.replace(fresh, objects[source])  # whole or not at all, as the library
        return errors

    shared = b"\0".join(s.encode() for s in (_compiler_version(cxx), _cpu_identity(), *flags))
    shared += b"".join(p.read_bytes() for p in _native("*.h")) + _headers_digest()
    objects = {source: _object_path(source, shared) for source in _native("*.cc")}
    _objects_dir().mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # the second time with no cached object
        missing = [source for source, path in objects.items() if not path.exists()]
        with concurrent.futures.ThreadPoolExecutor(cpu.usable_cores()) as pool:
            errors = next((e for e in pool.map(compile_into_cache, missing) if e), None)
        if errors is not None:
            return errors
        errors = run([cxx, "-shared", *arch, *map(str, objects.values()), "-o", str(built)])
        if errors is None:
            for path in objects.values():
                _touch(path)
        if errors is None or len(missing) == len(objects):
            return errors
        for source in objects.keys() - set(missing):  # a damaged cached object: compile again
            objects[source].unlink(missing_ok=True)
    return errors


def _objects_dir() -> Path:
    return cache_dir() / "objects"


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache: nothing is pruned from it either
        pass


def _prune_cache() -> None:
    """Drops the cached libraries and objects unused for :data:`CACHE_KEEP_DAYS` (a library is
    marked used at each load, an object at each link), and the dispatch timings of libraries
    no longer there or under the name before they were kept per usable core count."""
    root = cache_dir()
    cutoff = time.time() - CACHE_KEEP_DAYS * 86400
    for path in [*root.glob("cpu_attention-*.so"), *_objects_dir().glob("*.o")]:
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:  # gone already, or not ours to remove
            pass
    for path in root.glob("dispatch-*"):
        key, *cores = path.name.removeprefix("dispatch-").split(".")[0].split("-")
        # Without a core count: the name before timings were kept per usable core count.
        if not cores or not (root / f"cpu_attention-{key}.so").exists():
            path.unlink(missing_ok=True)


def _object_path(source: Path, shared: bytes) -> Path:
    """Where ``source``'s object is cached: keyed by the source and by what every object shares
    (the compiler, its flags, this CPU, the shared headers and the XLA FFI headers)."""
    key = hashlib.sha256(shared + b"\0" + source.read_bytes()).hexdigest()[:16]
    return _objects_dir() / f"{source.stem}-{key}.o"


@functools.cache
def register_targets() -> None:
    """Loads the library and registers its FFI targets with XLA (once per process)."""
    path = library_path()
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
    except OSError:
        # A cached library this loader cannot read (a damaged disk, a cache dir copied from
        # another system): rebuild it once instead of failing on every run.
        path.unlink(missing_ok=True)
        library_path.cache_clear()
        library = ctypes.cdll.LoadLibrary(str(library_path()))
    for symbol, target in TARGETS.values():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
        )


@functools.cache
def build_error() -> str | None:
    """None once the kernel is built and registered, else why it could not be (warned once:
    callers that fall back to XLA's attention would otherwise be silently slower)."""
    try:
        register_targets()
    except (KernelUnavailable, OSError) as err:
        warnings.warn(
            f"fused CPU attention unavailable, XLA's is used: {err}", RuntimeWarning, stacklevel=2
        )
        return str(err)
    return None


def cpu_attention_unavailable_reason(head_dim: int, dtype: jnp.dtype) -> str | None:
    """None if the fused kernels can run for this head size and dtype on this machine, else
    why not (building the kernel on first call)."""
    if jax.default_backend() != "cpu":
        return f"the fused kernel is for CPU; jax's backend here is {jax.default_backend()!r}"
    if jnp.dtype(dtype) != jnp.float32:
        return f"the fused kernel computes in float32, not {jnp.dtype(dtype).name}"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {head_dim} is not one of the kernel's sizes {SUPPORTED_HEAD_DIMS}"
    return build_error()
