"""bf16 matmuls on AMX tiles, forward and backward: XLA:CPU has no AMX path, and on CPUs with
AMX-BF16 torch's oneDNN runs bf16 GEMMs many times faster than XLA's (benchmarks/NOTES.md,
"bf16 on AMX"). Whether the kernel is used is decided in :mod:`hw2jax.attention.dispatch`."""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from hw2jax.errors import InputError
from hw2jax.kernels.build import (
    TARGETS,
    KernelUnavailable,
    build_error,
    kernel_vector_features,
    library_path,
)


@functools.cache
def _library_says_available() -> bool:
    return bool(ctypes.cdll.LoadLibrary(str(library_path())).Hw2jaxAmxAvailable())


def amx_matmul_unavailable_reason() -> str | None:
    """None if :func:`amx_matmul` can run here, else why not (building the kernel on first call)."""
    if jax.default_backend() != "cpu":
        return f"the AMX kernel is for CPU; jax's backend here is {jax.default_backend()!r}"
    try:
        if not kernel_vector_features().get("amx_bf16", False):
            return "this CPU (or $HW2JAX_KERNEL_MARCH) has no AMX-BF16"
    except KernelUnavailable as err:
        return str(err)
    if (error := build_error()) is not None:
        return error
    if not _library_says_available():
        return "Linux did not grant this process AMX's tile state (arch_prctl XTILEDATA)"
    return None


def _product(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool) -> jax.Array:
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    call = jax.ffi.ffi_call(
        TARGETS["amx_matmul"][1],
        jax.ShapeDtypeStruct((m, n), jnp.float32),
        vmap_method="sequential",
    )
    return call(a, b, transpose_a=np.int32(transpose_a), transpose_b=np.int32(transpose_b))


@functools.cache
def _partitioned(transpose_a: bool, transpose_b: bool):
    """The product on a mesh, with a's rows split over devices as the data-parallel step splits
    its batch: each device multiplies its rows by the whole of b; when a's rows are the
    contracted axis (the weight gradient, aᵀ g), each device's partial product is summed over
    the devices that split them."""

    def local(a, b):
        return _product(a, b, transpose_a, transpose_b)

    def row_axes(arg_shapes):
        spec = arg_shapes[0].sharding.spec
        return spec[0] if len(spec) > 0 else None

    def shardings(mesh, rows):
        whole = NamedSharding(mesh, PartitionSpec(None, None))
        split = NamedSharding(mesh, PartitionSpec(rows, None))
        if transpose_a:  # a [t, m] and b [t, n], both split along t; the result is summed
            return (split, split), whole
        return (split, whole), split

    def partition(mesh, arg_shapes, result_shape):
        rows = row_axes(arg_shapes)
        args, out = shardings(mesh, rows)
        if transpose_a and rows is not None:
            return mesh, lambda a, b: jax.lax.psum(local(a, b), rows), out, args
        return mesh, local, out, args

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, row_axes(arg_shapes))[1]

    rule = {
        (False, False): "m k, k n -> m n",
        (False, True): "m k, n k -> m n",
        (True, False): "t m, t n -> m n",
    }[(transpose_a, transpose_b)]
    sharded = custom_partitioning(local)
    sharded.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=("m", "n") if transpose_a else ("k", "n"),
    )
    return sharded


def _call(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool) -> jax.Array:
    return _partitioned(transpose_a, transpose_b)(a, b)


@jax.custom_vjp
def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return _call(a, b, False, False)


def _matmul_fwd(a, b):
    return _call(a, b, False, False), (a, b)


def _matmul_bwd(residuals, g):
    a, b = residuals
    g = g.astype(jnp.bfloat16)  # the cotangent in the inputs' precision, as autocast does
    da = _call(g, b, False, True).astype(a.dtype)  # g . b^T
    db = _call(a, g, True, False).astype(b.dtype)  # a^T . g
    return da, db


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def amx_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` over a's last axis, accumulated and returned in float32, on AMX tiles, with
    its gradient (cotangents rounded to bf16, products accumulated in float32).

    a: bfloat16 ``[..., K]``; b: bfloat16 ``[K, N]``. Raises :class:`KernelUnavailable` where
    :func:`amx_matmul_unavailable_reason` gives a reason."""
    if a.dtype != jnp.bfloat16 or b.dtype != jnp.bfloat16:
        raise InputError(
            f"amx_matmul multiplies bfloat16 arrays; got {a.dtype} and {b.dtype}. Cast them, or "
            "use jax.lax.dot_general for other dtypes."
        )
    if b.ndim != 2 or a.ndim < 1 or a.shape[-1] != b.shape[0]:
        raise InputError(f"amx_matmul wants a [..., K] and b [K, N]; got {a.shape} and {b.shape}.")
    reason = amx_matmul_unavailable_reason()
    if reason is not None:
        raise KernelUnavailable(f"the AMX matmul cannot run here: {reason}. Use XLA's dot.")
    lead = a.shape[:-1]
    out = _matmul(a.reshape(-1, a.shape[-1]), b)
    return out.reshape(*lead, b.shape[1])
