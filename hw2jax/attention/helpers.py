"""Input checks and the batched matmuls shared by the attention forms."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hw2jax import kernels
from hw2jax.attention import dispatch
from hw2jax.errors import InputError, InputTypeError
from hw2jax.kernels.matmul import product_gradients


def as_floating(x: jax.typing.ArrayLike, name: str, min_ndim: int) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < min_ndim:
        raise InputError(f"{name} needs at least {min_ndim} dims, got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputTypeError(
            f"{name} must be a floating array, got dtype {x.dtype}; cast it with "
            f"{name}.astype(jnp.float32)."
        )
    return x


def check_positive_int(value, name: str) -> int:
    """``value`` as an int >= 1 (a bool or a float is refused), or one line naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}.")
    return value


def check_key(key, name: str = "key") -> jax.Array:
    """A jax PRNG key (``jax.random.key(seed)``, or a legacy ``PRNGKey``), not a seed."""
    typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    legacy = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)
    if not (typed or legacy):
        shape = f" of shape {key.shape}" if hasattr(key, "shape") else ""
        raise InputTypeError(
            f"{name} must be a jax PRNG key, got {type(key).__name__}{shape}; pass "
            "jax.random.key(seed)."
        )
    return key


def check_qkv(q, k, v, causal: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v = (as_floating(a, n, 0) for a, n in ((q, "q"), (k, "k"), (v, "v")))
    layout = "[batch, T, heads, head_dim]"
    for a, n in ((q, "q"), (k, "k"), (v, "v")):
        if a.ndim != 4:
            raise InputError(f"{n} must be {layout}, got shape {a.shape}.")
    if k.shape != q.shape[:1] + k.shape[1:2] + q.shape[2:]:
        raise InputError(
            f"k {k.shape} must match q {q.shape} in batch, heads and head_dim ({layout})."
        )
    if v.shape[:3] != k.shape[:3]:
        raise InputError(f"v {v.shape} must match k {k.shape} in batch, T and heads.")
    if causal and q.shape[1] != k.shape[1]:
        raise InputError(
            f"causal attention needs as many queries as keys, got T_q={q.shape[1]} and "
            f"T_k={k.shape[1]}."
        )
    return q, k, v


def raise_if_not_finite(x: jax.Array, name: str) -> None:
    """Eagerly (outside jit): a NaN or inf in an input is named as such, not left to surface
    later as an overflow or as NaN outputs."""
    if isinstance(x, jax.core.Tracer):
        return
    bad = ~jnp.isfinite(x)
    if bool(jnp.any(bad)):
        first = tuple(int(i) for i in jnp.argwhere(bad, size=1)[0])
        raise InputError(
            f"{name} holds {int(jnp.sum(bad))} NaN or inf value(s), the first at index {first} "
            f"({float(x[first])}); attention of non-finite inputs is undefined. Find where they "
            "come from (jax.config.update('jax_debug_nans', True) stops at the first NaN)."
        )


def raise_if_overflowed(logits: jax.Array, what: str) -> None:
    """Eagerly (outside jit) turns an overflow into an error instead of NaN outputs."""
    if isinstance(logits, jax.core.Tracer):
        return
    if not bool(jnp.all(jnp.isfinite(logits))):
        raise FloatingPointError(
            f"{what} overflowed {logits.dtype} (|x|^2 is above {jnp.finfo(logits.dtype).max:.2e})."
            " Rescale the inputs, or enable float64 with "
            "jax.config.update('jax_enable_x64', True) and pass float64 arrays."
        )


def batched_dot(
    a: jax.Array,
    b: jax.Array,
    *,
    transpose_a: bool = False,
    transpose_b: bool = False,
    preferred_element_type=None,
) -> jax.Array:
    """Batched a @ b (a^T, b^T when asked) as one dot_general over the leading dims. Keep the
    batch (and head) dims leading: XLA's CPU dot is much faster on that layout than on an
    einsum that contracts across it, and a transposed operand named in the dot_general is not
    first copied into a transposed layout (as jnp.matmul of a swapaxes would be)."""
    batch = tuple(range(a.ndim - 2))
    contract = (
        (a.ndim - 2 if transpose_a else a.ndim - 1,),
        (b.ndim - 1 if transpose_b else b.ndim - 2,),
    )
    return jax.lax.dot_general(
        a, b, (contract, (batch, batch)), preferred_element_type=preferred_element_type
    )


def matmul_f32(
    a: jax.Array, b: jax.Array, transpose_b: bool = False, transpose_a: bool = False
) -> jax.Array:
    """:func:`batched_dot` accumulated and returned in float32; bf16 products of [B, ., .]
    arrays on AMX tiles where the dispatch rule says so (:func:`dispatch.batched_product`)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim < 2 or b.ndim != a.ndim or a.shape[:-2] != b.shape[:-2]:
        raise InputError(
            f"matmul_f32 needs two arrays of the same rank >= 2 with equal leading (batch) dims, "
            f"got {a.shape} and {b.shape}."
        )
    inner_a = a.shape[-2] if transpose_a else a.shape[-1]
    inner_b = b.shape[-1] if transpose_b else b.shape[-2]
    if inner_a != inner_b:
        raise InputError(
            f"matmul_f32: the contracted dims differ ({inner_a} in a {a.shape}, {inner_b} in b "
            f"{b.shape}, transpose_a={transpose_a}, transpose_b={transpose_b})."
        )
    path = dispatch.batched_product(
        a, b, transpose_a, transpose_b, kernels.bf16_products_unavailable_reason
    )
    if path == "amx":
        return kernels.amx_batched_matmul(a, b, transpose_a, transpose_b)
    if a.dtype == b.dtype == jnp.bfloat16 and not (transpose_a and transpose_b):
        return _bf16_product(a, b, transpose_a, transpose_b)
    return _product_f32(a, b, transpose_a, transpose_b)


def _product_f32(a, b, transpose_a: bool, transpose_b: bool) -> jax.Array:
    return batched_dot(
        a, b, transpose_a=transpose_a, transpose_b=transpose_b, preferred_element_type=jnp.float32
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bf16_product(a, b, transpose_a: bool, transpose_b: bool) -> jax.Array:
    """bf16 op(a) . op(b) in float32, with gradients that multiply bf16 by the cotangent rounded
    to bf16 (as torch's autocast and the AMX kernel do); JAX's rule would upcast a and b and
    multiply in float32."""
    return _product_f32(a, b, transpose_a, transpose_b)


def _bf16_product_fwd(a, b, transpose_a, transpose_b):
    return _bf16_product(a, b, transpose_a, transpose_b), (a, b)


def _bf16_product_bwd(transpose_a, transpose_b, residuals, g):
    a, b = residuals
    g = g.astype(jnp.bfloat16)
    da, db = product_gradients(_product_f32, a, b, g, transpose_a, transpose_b)
    return da.astype(a.dtype), db.astype(b.dtype)


_bf16_product.defvjp(_bf16_product_fwd, _bf16_product_bwd)


def pad_axis(a: jax.Array, axis: int, size: int) -> jax.Array:
    """``a`` padded with zeros at the end of ``axis`` up to ``size``."""
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, widths)


def sum_before(x: jax.Array) -> jax.Array:
    """Over the chunk axis of [B, H, chunks, ...] (axis 2): the sum of the chunks before each."""
    return jnp.cumsum(x, axis=2) - x


def sum_after(x: jax.Array) -> jax.Array:
    """Over the chunk axis (2): the sum of the chunks after each one."""
    return jnp.sum(x, axis=2, keepdims=True) - jnp.cumsum(x, axis=2)
