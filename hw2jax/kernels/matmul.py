"""bf16 matmuls on AMX tiles, forward and backward: XLA:CPU has no AMX path, and on CPUs with
AMX-BF16 torch's oneDNN runs bf16 GEMMs many times faster than XLA's (benchmarks/NOTES.md,
"bf16 on AMX"). On CPUs with AVX512-BF16 and no AMX the same products run on ``vdpbf16ps``
pair dot products (b packed the same way); the functions keep their ``amx_`` names. Whether the
kernel is used is decided in :mod:`hw2jax.attention.dispatch`."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax.errors import InputError
from hw2jax.kernels.build import (
    TARGETS,
    KernelUnavailable,
    build_error,
    kernel_vector_features,
    library_path,
)
from hw2jax.kernels.ffi import check_dense_bias, dense_on_rows, differentiated_by, on_mesh


@functools.cache
def _library_says() -> int:
    """1: the tiles can run here; 0: Linux refused them; -1: the library has no AMX code."""
    return int(ctypes.cdll.LoadLibrary(str(library_path())).Hw2jaxAmxAvailable())


@functools.cache
def _products_engine() -> int:
    """2: the products run on AMX tiles here; 1: on AVX512-BF16 pair dot products; 0: the
    library has AMX but Linux refused the tiles; -1: the library has neither."""
    return int(ctypes.cdll.LoadLibrary(str(library_path())).Hw2jaxBf16Products())


def _library_reason(
    what: str, features: tuple[str, ...], lacking: str, says: Callable[[], int]
) -> str | None:
    """Why the kernel ``what``, which needs one of the vector ``features`` (``lacking`` names them
    as missing), cannot run here, or None if it can. ``says()`` is the library's answer: -1 none
    of them built in, 0 refused by Linux (AMX's tile state), above 0 it runs."""
    if jax.default_backend() != "cpu":
        return f"the {what} is for CPU; jax's backend here is {jax.default_backend()!r}"
    try:
        found = kernel_vector_features()
    except KernelUnavailable as err:
        return str(err)
    if not any(found.get(feature, False) for feature in features):
        return f"this CPU (or $HW2JAX_KERNEL_MARCH) has {lacking}"
    if (error := build_error()) is not None:
        return error
    if (answer := says()) == -1:
        return (
            f"the kernel library was built without {' or '.join(_NAMES[f] for f in features)} "
            "(its -march build failed and a generic one was made; check the compiler, or set "
            "$HW2JAX_KERNEL_MARCH)"
        )
    if answer == 0:
        return "Linux did not grant this process AMX's tile state (arch_prctl XTILEDATA)"
    return None


_NAMES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}


def bf16_products_unavailable_reason() -> str | None:
    """None if :func:`amx_matmul`, :func:`amx_batched_matmul` and :func:`amx_dense` can
    run here (on AMX tiles or AVX512-BF16 pair dots), else why not (building the kernels on
    first call)."""
    return _library_reason(
        "bf16 product kernel",
        ("amx_bf16", "avx512_bf16"),
        "neither AMX-BF16 nor AVX512-BF16",
        _products_engine,
    )


def bf16_products_engine() -> str:
    """What runs the bf16 products here: "AMX tiles" or "AVX512-BF16 pair dots" (call after
    :func:`bf16_products_unavailable_reason` returned None)."""
    return {2: "AMX tiles", 1: "AVX512-BF16 pair dots"}[_products_engine()]


def amx_matmul_unavailable_reason() -> str | None:
    """None if AMX's tiles can run here (:func:`hw2jax.kernels.amx_attention` needs them), else
    why not (building the kernel on first call)."""
    return _library_reason("AMX kernel", ("amx_bf16",), "no AMX-BF16", _library_says)


def _product(
    a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool, out: str
) -> jax.Array:
    """op(a) . op(b) accumulated in float32, returned as ``out`` ("float32" or "bfloat16",
    rounded as it leaves the tiles); a and b 2-D, or 3-D with one leading batch axis."""
    m = a.shape[-1] if transpose_a else a.shape[-2]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    call = jax.ffi.ffi_call(
        TARGETS["amx_matmul" if out == "float32" else "amx_matmul_bf16"][1],
        jax.ShapeDtypeStruct((*a.shape[:-2], m, n), jnp.dtype(out)),
        vmap_method="sequential",
    )
    return call(a, b, transpose_a=np.int32(transpose_a), transpose_b=np.int32(transpose_b))


@functools.cache
def _partitioned(transpose_a: bool, transpose_b: bool, batched: bool, out: str):
    """The product on a mesh. Batched, the batch axis may be split: each device multiplies its
    own matrices. Otherwise a's rows may be split, as the data-parallel step splits its batch:
    each device multiplies its rows by the whole of b, and when a's rows are the contracted axis
    (the weight gradient, aᵀ g) each device's partial product is summed over the devices that
    split them."""

    def local(a, b):
        return _product(a, b, transpose_a, transpose_b, out)

    a_axes = "k m" if transpose_a else "m k"
    b_axes = "n k" if transpose_b else "k n"
    if batched:
        return on_mesh(local, f"z {a_axes}, z {b_axes} -> z m n", split="z")
    return on_mesh(local, f"{a_axes}, {b_axes} -> m n", split=a_axes[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(
    a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool, out: str = "float32"
) -> jax.Array:
    return _partitioned(transpose_a, transpose_b, a.ndim == 3, out)(a, b)


def _matmul_fwd(a, b, transpose_a, transpose_b, out):
    return _matmul(a, b, transpose_a, transpose_b, out), (a, b)


def product_gradients(product, a, b, g, transpose_a: bool, transpose_b: bool):
    """(da, db) for c = op(a) . op(b) and g = dL/dc, each one ``product(x, y, tx, ty)`` (that is
    op(x) . op(y)) with no transposed copy asked for. g is used as given."""
    if (transpose_a, transpose_b) == (False, False):  # c = a b
        return product(g, b, False, True), product(a, g, True, False)
    if (transpose_a, transpose_b) == (False, True):  # c = a bᵀ
        return product(g, b, False, False), product(g, a, True, False)
    if (transpose_a, transpose_b) == (True, False):  # c = aᵀ b
        return product(b, g, False, True), product(a, g, False, False)
    raise NotImplementedError("op(a) . op(b) with both transposed has no gradient here")


def _matmul_bwd(transpose_a, transpose_b, out, residuals, g):
    """The gradients of c = op(a) . op(b), each one more product on the tiles, rounded to the
    inputs' bf16 as they leave them; the 2-D aᵀ g forms stay float32 until after the sum over
    the devices that split their rows."""
    a, b = residuals
    g = g.astype(jnp.bfloat16)  # the cotangent in the inputs' precision, as autocast does

    def product(x, y, tx, ty):
        summed = tx and x.ndim == 2  # a's rows are contracted: split rows sum partial products
        return _matmul(x, y, tx, ty, "float32" if summed else "bfloat16")

    da, db = product_gradients(product, a, b, g, transpose_a, transpose_b)
    return da.astype(a.dtype), db.astype(b.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _check_bf16(name: str, a: jax.Array, b: jax.Array) -> None:
    if a.dtype != jnp.bfloat16 or b.dtype != jnp.bfloat16:
        raise InputError(
            f"{name} multiplies bfloat16 arrays; got {a.dtype} and {b.dtype}. Cast them, or "
            "use jax.lax.dot_general for other dtypes."
        )


def _check_available() -> None:
    reason = bf16_products_unavailable_reason()
    if reason is not None:
        raise KernelUnavailable(
            f"the bf16 product kernel cannot run here: {reason}. Use XLA's dot."
        )


def _out_name(out_dtype) -> str:
    name = jnp.dtype(out_dtype).name
    if name not in ("float32", "bfloat16"):
        raise InputError(f"the AMX matmul returns float32 or bfloat16, not {name}.")
    return name


def amx_batched_matmul(
    a: jax.Array,
    b: jax.Array,
    transpose_a: bool = False,
    transpose_b: bool = False,
    out_dtype=jnp.float32,
) -> jax.Array:
    """``op(a) @ op(b)`` for each matrix of a batch, accumulated in float32 on AMX tiles and
    returned as ``out_dtype`` (float32, or bfloat16 rounded as it leaves the tiles), with its
    gradient; op() transposes the last two axes where asked (not both).

    a, b: bfloat16 ``[B, ., .]``. Raises :class:`KernelUnavailable` where
    :func:`bf16_products_unavailable_reason` gives a reason."""
    _check_bf16("amx_batched_matmul", a, b)
    inner_a = a.shape[-2] if transpose_a else a.shape[-1]
    inner_b = b.shape[-1] if transpose_b else b.shape[-2]
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or inner_a != inner_b:
        raise InputError(
            "amx_batched_matmul wants a and b of shape [B, ., .] with one batch and matching "
            f"contracted axes; got {a.shape} and {b.shape} (transpose_a={transpose_a}, "
            f"transpose_b={transpose_b})."
        )
    if transpose_a and transpose_b:
        raise InputError("amx_batched_matmul transposes a or b, not both: swap them instead.")
    out = _out_name(out_dtype)
    _check_available()
    return _matmul(a, b, transpose_a, transpose_b, out)


def amx_matmul(a: jax.Array, b: jax.Array, out_dtype=jnp.float32) -> jax.Array:
    """``a @ b`` over a's last axis, accumulated in float32 on AMX tiles and returned as
    ``out_dtype`` (float32, or bfloat16 rounded as it leaves the tiles), with its gradient
    (cotangents rounded to bf16, products accumulated in float32).

    a: bfloat16 ``[..., K]``; b: bfloat16 ``[K, N]``. Raises :class:`KernelUnavailable` where
    :func:`bf16_products_unavailable_reason` gives a reason."""
    _check_bf16("amx_matmul", a, b)
    if b.ndim != 2 or a.ndim < 1 or a.shape[-1] != b.shape[0]:
        raise InputError(f"amx_matmul wants a [..., K] and b [K, N]; got {a.shape} and {b.shape}.")
    out = _out_name(out_dtype)
    _check_available()
    lead = a.shape[:-1]
    return _matmul(a.reshape(-1, a.shape[-1]), b, False, False, out).reshape(*lead, b.shape[1])


@functools.cache
def _dense(weights: str, with_bias: bool, gelu: bool, out: str):
    """:func:`amx_dense`'s 2-D form for ``weights`` of that dtype: the call on each device's
    rows where a mesh splits them, and under differentiation the same in XLA's steps around
    :func:`amx_matmul` (GELU's derivative wants the float32 pre-activation they keep)."""
    target = "amx_dense" + ("_bf16_weights" if weights == "bfloat16" else "")
    target += "_bf16" if out == "bfloat16" else ""

    def steps(a, b, *bias):
        h = _matmul(a, b.astype(jnp.bfloat16), False, False)
        h = h + bias[0] if bias else h
        return (jax.nn.gelu(h, approximate=False) if gelu else h).astype(out)

    return differentiated_by(dense_on_rows(TARGETS[target][1], with_bias, gelu, out), steps)


def amx_dense(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    gelu: bool = False,
    out_dtype=jnp.float32,
) -> jax.Array:
    """A bf16 dense layer in one call: ``x @ kernel`` accumulated in float32, plus ``bias``
    (where given), then the exact GELU (erf) where asked, returned as ``out_dtype`` (float32, or
    bfloat16 rounded as it leaves the tiles). float32 weights are rounded to bf16 as the kernel
    packs them; the bias, GELU and rounding run while the product is in cache. The floats are
    those of ``x @ kernel.astype(bf16)``, ``+ bias``, GELU and ``.astype`` in XLA's steps (GELU
    by the kernels' erf), without their passes over memory. Differentiated, it runs as those
    steps around :func:`amx_matmul`.

    x: bfloat16 ``[..., K]``; kernel: bfloat16 or float32 ``[K, N]``; bias: ``[N]``, added in
    float32. Raises :class:`KernelUnavailable` where :func:`bf16_products_unavailable_reason`
    gives a reason."""
    if x.dtype != jnp.bfloat16 or kernel.dtype not in (jnp.bfloat16, jnp.float32):
        raise InputError(
            f"amx_dense multiplies bfloat16 x by bfloat16 or float32 weights; got {x.dtype} and "
            f"{kernel.dtype}. Cast x, or use jax.lax.dot_general for other dtypes."
        )
    if kernel.ndim != 2 or x.ndim < 1 or x.shape[-1] != kernel.shape[0] or x.shape[-1] == 0:
        raise InputError(
            f"amx_dense wants x [..., K] and kernel [K, N] with K > 0; got {x.shape} and "
            f"{kernel.shape}."
        )
    check_dense_bias("amx_dense", kernel, bias, gelu)
    out = _out_name(out_dtype)
    _check_available()
    lead = x.shape[:-1]
    dense = _dense(kernel.dtype.name, bias is not None, gelu, out)
    biases = () if bias is None else (bias.astype(jnp.float32),)
    return dense(x.reshape(-1, x.shape[-1]), kernel, *biases).reshape(*lead, kernel.shape[1])
