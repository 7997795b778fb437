"""Fused attention kernels for XLA:CPU, called through ``jax.ffi``.

XLA's CPU backend has no fused attention: it writes the [T, T] scores to memory and reads them
back. ``cpu_attention.cc`` has three kernels that keep blocks of scores in registers and cache
instead, as torch's CPU SDPA does:

- :func:`cpu_attention`: softmax attention with a key bias, the forward pass (BERT's);
  gradients from the plain XLA formula;
- :func:`cpu_flash_attention`: softmax attention, causal or not, forward and backward
  (FlashAttention-2's algorithm: the backward recomputes probabilities from each row's
  log-sum-exp);
- :func:`causal_linear_product_cpu`: causal linear attention's products by the chunk
  algorithm, forward and backward.

Timings: ``benchmarks/cpu_attention_kernel.py``, ``benchmarks/results/cpu_gradients/``.

The C++ source ships with the package and is compiled on first use with the system's C++
compiler (``$CXX``, else ``c++``/``g++``/``clang++``) for this CPU (``-march=native``), into
``$HW2JAX_KERNEL_CACHE`` (default ``~/.cache/hw2jax/kernels``). Every kernel works under
``jax.vmap`` (vmapped axes fold into the batch), and under ``jax.jit`` on a mesh a batch- or
head-sharded input stays sharded: the kernel runs on each device's slice.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from hw2jax.models.bert_attention import key_bias_attention
from hw2jax.timing import cpu_vector_features

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "KernelUnavailable",
    "build_error",
    "causal_linear_product_cpu",
    "cpu_attention",
    "cpu_attention_unavailable_reason",
    "cpu_flash_attention",
    "fused_attention_pays_off",
    "kernel_vector_features",
    "linear_attention_cpu",
]

_SOURCE = Path(__file__).with_name("cpu_attention.cc")
# FFI targets: (symbol in the library, name registered with XLA).
_TARGETS = {
    "attention": ("Hw2jaxCpuAttention", "hw2jax_cpu_attention"),
    "flash_forward": ("Hw2jaxCpuFlashForward", "hw2jax_cpu_flash_forward"),
    "flash_backward": ("Hw2jaxCpuFlashBackward", "hw2jax_cpu_flash_backward"),
    "linear_forward": ("Hw2jaxCpuLinearForward", "hw2jax_cpu_linear_forward"),
    "linear_backward": ("Hw2jaxCpuLinearBackward", "hw2jax_cpu_linear_backward"),
    "dense_forward": ("Hw2jaxCpuDenseLinearForward", "hw2jax_cpu_dense_linear_forward"),
    "dense_backward": ("Hw2jaxCpuDenseLinearBackward", "hw2jax_cpu_dense_linear_backward"),
}
SUPPORTED_HEAD_DIMS = tuple(range(16, 129, 16))  # the kernel's compiled variants


class KernelUnavailable(RuntimeError):
    """The native kernel could not be built or loaded here; the message says why and what to do."""


def _cache_dir() -> Path:
    if os.environ.get("HW2JAX_KERNEL_CACHE"):
        return Path(os.environ["HW2JAX_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hw2jax" / "kernels"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise KernelUnavailable(
        "no C++ compiler found for the fused CPU attention kernel: install one (Debian/Ubuntu: "
        "apt-get install g++) or set $CXX, or pass attention='xla' to use XLA's attention."
    )


def _cpu_identity() -> str:
    """-march=native code must not run on another CPU: the cache key names this one."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _march() -> str:
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
    features = cpu_vector_features()
    if _march() == "native":
        return features
    target = _target_features(_compiler(), _march())
    return {name: has and target.get(name, False) for name, has in features.items()}


def fused_attention_pays_off(features: dict[str, bool]) -> bool:
    """The rule of ``attention="auto"``: use the fused kernel only where its code has AVX-512.

    Its inner loop keeps 8 query rows x 32 keys of scores in 16 512-bit registers. Built for
    AVX2 alone, the compiler splits each into two 256-bit halves and the tile no longer fits the
    16 ymm registers: it spills, and XLA's attention is the faster one (measured:
    ``benchmarks/NOTES.md``, "The fused kernel without AVX-512")."""
    return bool(features.get("avx512f"))


@functools.cache
def _library_path() -> Path:
    cxx = _compiler()
    include = jax.ffi.include_dir()
    source = _SOURCE.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join(
            s.encode() for s in (version, jax.__version__, _cpu_identity(), include, _march())
        )
        + source
    ).hexdigest()[:16]
    target = _cache_dir() / f"cpu_attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    base = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-isystem", include, str(_SOURCE)]
    # Compile to a temporary name and rename: a concurrent or interrupted build never leaves a
    # half-written library under the final name.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        errors = ""
        for arch in ([f"-march={_march()}"], []):  # some compilers/CPUs lack -march=native
            done = subprocess.run(base + arch + ["-o", str(built)], capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(built, target)
                return target
            errors = done.stderr
    raise KernelUnavailable(
        f"building the fused CPU attention kernel with {cxx} failed:\n{errors[-2000:]}\n"
        "Pass attention='xla' to use XLA's attention instead."
    )


@functools.cache
def _register() -> None:
    path = _library_path()
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
    except OSError:
        # A cached library this loader cannot read (a damaged disk, a cache dir copied from
        # another system): rebuild it once instead of failing on every run.
        path.unlink(missing_ok=True)
        _library_path.cache_clear()
        library = ctypes.cdll.LoadLibrary(str(_library_path()))
    for symbol, target in _TARGETS.values():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
        )


@functools.cache
def build_error() -> str | None:
    """None once the kernel is built and registered, else why it could not be (warned once:
    callers that fall back to XLA's attention would otherwise be silently slower)."""
    try:
        _register()
    except (KernelUnavailable, OSError) as err:
        warnings.warn(
            f"fused CPU attention unavailable, XLA's is used: {err}", RuntimeWarning, stacklevel=2
        )
        return str(err)
    return None


def cpu_attention_unavailable_reason(head_dim: int, dtype: jnp.dtype) -> str | None:
    """None if :func:`cpu_attention` can run for this head size and dtype on this machine,
    else why not (building the kernel on first call)."""
    if jax.default_backend() != "cpu":
        return f"the fused kernel is for CPU; jax's backend here is {jax.default_backend()!r}"
    if jnp.dtype(dtype) != jnp.float32:
        return f"the fused kernel computes in float32, not {jnp.dtype(dtype).name}"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {head_dim} is not one of the kernel's sizes {SUPPORTED_HEAD_DIMS}"
    return build_error()


# The layouts of the kernels' operands and results: batch first, heads the only other axis a
# mesh may split (sequences and heads are independent; positions and features stay whole).
_AXES = {
    "bthd": "b t h d",
    "bht": "b h t",
    "bth": "b t h",
    "bt": "b t",
    "bhdd": "b h d e",  # a [D, D] state per (sequence, head)
    "bhd": "b h d",
}


def _result_shape(layout: str, bthd: tuple[int, ...]) -> tuple[int, ...]:
    b, t, h, d = bthd
    shapes = {"bthd": (b, t, h, d), "bht": (b, h, t), "bth": (b, t, h)}
    return {**shapes, "bhdd": (b, h, d, d), "bhd": (b, h, d)}[layout]


def _shardings(mesh, layouts: tuple[str, ...], spec: PartitionSpec) -> tuple:
    """Shardings for `layouts` that keep the batch and heads axes of a [B, T, heads, D] spec."""
    batch = spec[0] if len(spec) > 0 else None
    heads = spec[2] if len(spec) > 2 else None
    axes = {"b": batch, "h": heads}
    return tuple(
        NamedSharding(mesh, PartitionSpec(*(axes.get(a) for a in layout))) for layout in layouts
    )


@functools.cache
def _kernel(target: str, ins: tuple[str, ...], outs: tuple[str, ...], attrs: tuple = ()):
    """The FFI target as a function of its operands (the first [B, T, heads, D]), with `attrs`
    ((name, value) pairs) fixed. Under ``jax.vmap`` the vmapped axes fold into the batch axis
    (one call); under ``jax.jit`` on a mesh, batch- or head-sharded operands stay sharded and
    the kernel runs on each device's slice."""

    def ffi(*args):
        results = tuple(
            jax.ShapeDtypeStruct(_result_shape(layout, args[0].shape), jnp.float32)
            for layout in outs
        )
        call = jax.ffi.ffi_call(target, results, vmap_method="broadcast_all")
        return call(*args, **dict(attrs))

    sharded = custom_partitioning(ffi)

    def partition(mesh, arg_shapes, result_shape):
        spec = arg_shapes[0].sharding.spec
        return mesh, ffi, _shardings(mesh, outs, spec), _shardings(mesh, ins, spec)

    def infer(mesh, arg_shapes, result_shape):
        return _shardings(mesh, outs, arg_shapes[0].sharding.spec)

    sharded.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        sharding_rule=", ".join(_AXES[a] for a in ins) + " -> " + ", ".join(_AXES[a] for a in outs),
        # Every factor but batch and heads, in order of appearance (Shardy).
        need_replication_factors=tuple(
            f for f in "tde" if any(f in _AXES[a].split() for a in ins + outs)
        ),
    )

    @jax.custom_batching.custom_vmap
    def call(*args):
        return sharded(*args)

    @call.def_vmap
    def _fold(axis_size, in_batched, *args):
        args = [
            a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, b in zip(args, in_batched, strict=True)
        ]
        results = call(*(a.reshape(-1, *a.shape[2:]) for a in args))
        return tuple(r.reshape(axis_size, -1, *r.shape[1:]) for r in results), (True,) * len(outs)

    return call


def _batchable_attention(scale: float):
    kernel = _kernel(
        _TARGETS["attention"][1],
        ("bthd",) * 3 + ("bt",),
        ("bthd",),
        (("scale", np.float32(scale)),),
    )
    return lambda *args: kernel(*args)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, key_bias, scale):
    return _batchable_attention(scale)(q, k, v, key_bias)


def _attention_fwd(q, k, v, key_bias, scale):
    return _attention(q, k, v, key_bias, scale), (q, k, v, key_bias)


def _attention_bwd(scale, residuals, grad):
    # The gradient of the same function as XLA computes it (BERT's other path).
    _, pullback = jax.vjp(
        lambda q, k, v, key_bias: key_bias_attention(q * scale, k, v, key_bias), *residuals
    )
    return pullback(grad)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check_softmax_inputs(name: str, q, k, v) -> None:
    """Shapes first (ValueError), then whether the kernel can run here (KernelUnavailable)."""
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"{name} wants q, k and v of one shape [batch, T, heads, head_dim]; got "
            f"{q.shape}, {k.shape}, {v.shape}. Use hw2jax.attention.softmax_attention for others."
        )
    reason = cpu_attention_unavailable_reason(q.shape[-1], q.dtype)
    if reason is not None:
        raise KernelUnavailable(reason)


def cpu_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_bias: jax.Array | None = None,
    *,
    scale: float | None = None,
) -> jax.Array:
    """softmax(scale q.k^T + key_bias) v with the fused CPU kernel.

    q, k, v: float32 ``[B, T, heads, D]`` (the layout the projections produce);
    key_bias: ``[B, T]``, added to the scores of each key (0 keeps a key, a large negative
    number such as ``finfo(float32).min`` masks it); scale defaults to 1/sqrt(D).
    Raises :class:`KernelUnavailable` (or ValueError for bad shapes) with what to do instead.
    """
    _check_softmax_inputs("cpu_attention", q, k, v)
    if key_bias is None:
        key_bias = jnp.zeros(q.shape[:2], jnp.float32)
    if jnp.asarray(key_bias).dtype == jnp.bool_:
        raise ValueError(
            "key_bias is added to the scores, not a boolean mask: pass "
            "jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)."
        )
    if key_bias.shape != q.shape[:2]:
        raise ValueError(f"key_bias must be [batch, T] = {q.shape[:2]}, got {key_bias.shape}.")
    scale = 1.0 / float(np.sqrt(q.shape[-1])) if scale is None else float(scale)
    return _attention(q, k, v, key_bias.astype(jnp.float32), scale)


def _flash_attrs(scale: float, causal: bool) -> tuple:
    return ("scale", np.float32(scale)), ("causal", np.int32(causal))


def _flash_forward_call(q, k, v, scale: float, causal: bool):
    kernel = _kernel(
        _TARGETS["flash_forward"][1], ("bthd",) * 3, ("bthd", "bht"), _flash_attrs(scale, causal)
    )
    return kernel(q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, scale: float, causal: bool):
    return _flash_forward_call(q, k, v, scale, causal)[0]


def _flash_fwd(q, k, v, scale, causal):
    out, lse = _flash_forward_call(q, k, v, scale, causal)
    return out, (q, k, v, out, lse)


def _flash_bwd(scale, causal, residuals, grad):
    kernel = _kernel(
        _TARGETS["flash_backward"][1],
        ("bthd",) * 4 + ("bht", "bthd"),
        ("bthd",) * 3,
        _flash_attrs(scale, causal),
    )
    return kernel(*residuals, grad)


_flash.defvjp(_flash_fwd, _flash_bwd)


def cpu_flash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, scale: float | None = None
) -> jax.Array:
    """softmax(scale q.k^T) v, optionally causal, forward and backward by the fused CPU kernels.

    The forward pass keeps each row's log-sum-exp; the backward pass recomputes the probabilities
    block by block from it (FlashAttention-2), so neither stores the [T, T] scores. q, k, v:
    float32 ``[B, T, heads, D]`` of one shape; scale defaults to 1/sqrt(D). Raises
    :class:`KernelUnavailable` (or ValueError for bad shapes) with what to do instead.
    """
    _check_softmax_inputs("cpu_flash_attention", q, k, v)
    scale = 1.0 / float(np.sqrt(q.shape[-1])) if scale is None else float(scale)
    return _flash(q, k, v, scale, bool(causal))


@jax.custom_vjp
def _linear_product(fq, fk, v):
    return _linear_product_fwd(fq, fk, v)[0]


def _linear_product_fwd(fq, fk, v):
    kernel = _kernel(_TARGETS["linear_forward"][1], ("bthd",) * 3, ("bthd", "bth"))
    return kernel(fq, fk, v), (fq, fk, v)


def _linear_product_bwd(residuals, grads):
    kernel = _kernel(_TARGETS["linear_backward"][1], ("bthd",) * 4 + ("bth",), ("bthd",) * 3)
    return kernel(*residuals, *grads)


_linear_product.defvjp(_linear_product_fwd, _linear_product_bwd)


def causal_linear_unavailable_reason(fq: jax.Array, v: jax.Array) -> str | None:
    """None if :func:`causal_linear_product_cpu` can run for these features and values here."""
    if fq.shape != v.shape:
        return f"the fused kernel wants features and values of one shape; got {fq.shape}, {v.shape}"
    return cpu_attention_unavailable_reason(fq.shape[-1], jnp.result_type(fq, v))


def causal_linear_product_cpu(
    fq: jax.Array, fk: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum_{j<=i} (fq_i . fk_j) v_j, sum_{j<=i} fq_i . fk_j), causal linear attention's
    products, by the fused CPU kernels (forward and backward): the chunk algorithm with chunks
    of 64, as :func:`hw2jax.attention.linear_pallas.causal_linear_product_pallas`.

    fq, fk, v: float32 ``[B, T, heads, D]`` of one shape, D a multiple of 16 up to 128.
    Returns num ``[B, T, heads, D]`` and den ``[B, T, heads, 1]``. Raises
    :class:`KernelUnavailable` (or ValueError for bad shapes) with what to do instead.
    """
    if fq.ndim != 4 or fk.shape != fq.shape:
        raise ValueError(
            "causal_linear_product_cpu wants fq and fk of one shape [batch, T, heads, D]; got "
            f"{fq.shape}, {fk.shape}. Use linear_attention(method='chunked') for others."
        )
    reason = causal_linear_unavailable_reason(fq, v)
    if reason is not None:
        raise KernelUnavailable(reason)
    num, den = _linear_product(fq, fk, v)
    return num, den[..., None]


_FEATURE_CODES = {"elu": 0, "relu": 1}  # the kernel's phi: elu + 1, or relu


def _dense_attrs(feature_map: str, eps: float) -> tuple:
    return ("feature", np.int32(_FEATURE_CODES[feature_map])), ("eps", np.float32(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dense_linear(q, k, v, feature_map: str, eps: float):
    return _dense_linear_fwd(q, k, v, feature_map, eps)[0]


def _dense_linear_fwd(q, k, v, feature_map, eps):
    kernel = _kernel(
        _TARGETS["dense_forward"][1],
        ("bthd",) * 3,
        ("bthd", "bhdd", "bhd"),
        _dense_attrs(feature_map, eps),
    )
    out, state, z = kernel(q, k, v)
    return out, (q, k, v, out, state, z)


def _dense_linear_bwd(feature_map, eps, residuals, grad):
    kernel = _kernel(
        _TARGETS["dense_backward"][1],
        ("bthd",) * 4 + ("bhdd", "bhd", "bthd"),
        ("bthd",) * 3,
        _dense_attrs(feature_map, eps),
    )
    return kernel(*residuals, grad)


_dense_linear.defvjp(_dense_linear_fwd, _dense_linear_bwd)


def dense_linear_unavailable_reason(q: jax.Array, v: jax.Array, feature_map: str) -> str | None:
    """None if :func:`linear_attention_cpu` can run for these inputs and features here."""
    if feature_map not in _FEATURE_CODES:
        return f"the fused kernel computes elu + 1 or relu features, not {feature_map!r}"
    return causal_linear_unavailable_reason(q, v)


def linear_attention_cpu(
    q: jax.Array, k: jax.Array, v: jax.Array, *, feature_map: str = "elu", eps: float = 1e-6
) -> jax.Array:
    """Non-causal linear attention, phi(q_i) S / (phi(q_i) . z + eps) with S = sum_j phi(k_j)
    v_j^T and z = sum_j phi(k_j), features included, forward and backward by the fused CPU
    kernels: each pass streams q, k, v once in tiles and applies phi on the way.

    q, k, v: float32 ``[B, T, heads, D]`` of one shape, D a multiple of 16 up to 128;
    feature_map "elu" (elu + 1) or "relu". Raises :class:`KernelUnavailable` (or ValueError for
    bad shapes) with what to do instead.
    """
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(
            "linear_attention_cpu wants q and k of one shape [batch, T, heads, D]; got "
            f"{q.shape}, {k.shape}. Use linear_attention(method='chunked') for others."
        )
    reason = dense_linear_unavailable_reason(q, v, feature_map)
    if reason is not None:
        raise KernelUnavailable(reason)
    return _dense_linear(q, k, v, feature_map, float(eps))
