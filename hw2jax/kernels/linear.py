"""Linear attention by the fused CPU kernels, forward and backward: causal linear attention's
products by the chunk algorithm (chunks of 64), and non-causal linear attention with its
features applied on the way."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax.errors import InputError
from hw2jax.kernels.build import TARGETS, KernelUnavailable, cpu_attention_unavailable_reason
from hw2jax.kernels.ffi import ffi_kernel


@jax.custom_vjp
def _linear_product(fq, fk, v):
    return _linear_product_fwd(fq, fk, v)[0]


def _linear_product_fwd(fq, fk, v):
    kernel = ffi_kernel(TARGETS["linear_forward"][1], ("bthd",) * 3, ("bthd", "bth"))
    return kernel(fq, fk, v), (fq, fk, v)


def _linear_product_bwd(residuals, grads):
    kernel = ffi_kernel(TARGETS["linear_backward"][1], ("bthd",) * 4 + ("bth",), ("bthd",) * 3)
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
        raise InputError(
            "causal_linear_product_cpu wants fq and fk of one shape [batch, T, heads, D]; got "
            f"{fq.shape}, {fk.shape}. Use linear_attention(implementation='chunked') for others."
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
    kernel = ffi_kernel(
        TARGETS["dense_forward"][1],
        ("bthd",) * 3,
        ("bthd", "bhdd", "bhd"),
        _dense_attrs(feature_map, eps),
    )
    out, state, z = kernel(q, k, v)
    return out, (q, k, v, out, state, z)


def _dense_linear_bwd(feature_map, eps, residuals, grad):
    kernel = ffi_kernel(
        TARGETS["dense_backward"][1],
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
        raise InputError(
            "linear_attention_cpu wants q and k of one shape [batch, T, heads, D]; got "
            f"{q.shape}, {k.shape}. Use linear_attention(implementation='chunked') for others."
        )
    reason = dense_linear_unavailable_reason(q, v, feature_map)
    if reason is not None:
        raise KernelUnavailable(reason)
    return _dense_linear(q, k, v, feature_map, float(eps))
