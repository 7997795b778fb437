"""float32 dense layers in one CPU kernel call: ``x @ kernel``, plus a bias and the exact GELU
where asked, applied while each tile of the product is in registers. On MiniLM's shapes on the
AMX Xeon XLA's own float32 dot took 1.05-1.08x the time of torch's (MKL's) and the kernel
0.99-1.04x; with the GELU's pass gone, MiniLM's float32 forward took 4-5 % less time
(benchmarks/results/amx_xeon/float32_dense/). Forward only: differentiated, the call runs as
another form of the same function, forward and backward. Whether it is used is decided in
:mod:`hw2jax.attention.dispatch`."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from hw2jax.errors import InputError
from hw2jax.kernels.build import TARGETS, KernelUnavailable, cpu_attention_unavailable_reason
from hw2jax.kernels.ffi import check_dense_bias, dense_on_rows, differentiated_by


def xla_dense(x: jax.Array, kernel: jax.Array, bias=None, *, gelu: bool = False) -> jax.Array:
    """What :func:`float32_dense` computes, in XLA's steps: the product (float32), ``+ bias``
    where given, then ``jax.nn.gelu(., approximate=False)`` where asked."""
    h = jnp.dot(x, kernel, preferred_element_type=jnp.float32)
    h = h if bias is None else h + bias
    return jax.nn.gelu(h, approximate=False) if gelu else h


def float32_dense_unsupported(x_shape, kernel_shape, dtype) -> str | None:
    """Why :func:`float32_dense` does not take x and a kernel of these shapes and this dtype
    (both the same), or None."""
    if jnp.dtype(dtype) != jnp.float32:
        return f"it multiplies float32; got {jnp.dtype(dtype).name}"
    if len(kernel_shape) != 2 or len(x_shape) < 1 or x_shape[-1] != kernel_shape[0]:
        shapes = f"{tuple(x_shape)} and {tuple(kernel_shape)}"
        return f"it wants x [..., K] and a kernel [K, N]; got {shapes}"
    if x_shape[-1] == 0:
        return "the contracted axis K is empty"
    return None


def float32_dense_unavailable_reason(x_shape, kernel_shape, dtype) -> str | None:
    """Why :func:`float32_dense` cannot take these inputs here: the inputs
    (:func:`float32_dense_unsupported`), else the kernels' build; None if it can."""
    problem = float32_dense_unsupported(x_shape, kernel_shape, dtype)
    return problem or cpu_attention_unavailable_reason(16, jnp.float32)


def float32_dense(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    gelu: bool = False,
    differentiated: Callable[..., jax.Array] | None = None,
) -> jax.Array:
    """``x @ kernel`` in float32, plus ``bias`` where given, then the exact GELU (the kernels'
    erf, as :func:`hw2jax.kernels.cpu_bias_gelu`) where asked, in one call on XLA's threads.
    Each output is a float32 sum over K in order (one rounding per multiply-add), so it differs
    from XLA's dot by float32 rounding, not more.

    Differentiated, it runs as ``differentiated(x, kernel)`` or ``differentiated(x, kernel,
    bias)`` forward and backward (the same function computed another way; by default
    :func:`xla_dense`). x: float32 ``[..., K]``; kernel: float32 ``[K, N]``; bias: ``[N]``.
    Raises :class:`InputError` for other inputs and :class:`KernelUnavailable` where the kernel
    cannot run here."""
    if (problem := float32_dense_unsupported(x.shape, kernel.shape, x.dtype)) is not None:
        raise InputError(f"float32_dense: {problem}. jnp.dot takes any input.")
    if kernel.dtype != jnp.float32:
        raise InputError(f"float32_dense multiplies float32 weights; got {kernel.dtype}.")
    check_dense_bias("float32_dense", kernel, bias, gelu)
    if (reason := cpu_attention_unavailable_reason(16, jnp.float32)) is not None:
        raise KernelUnavailable(reason)
    biases = () if bias is None else (bias.astype(jnp.float32),)
    on_rows = dense_on_rows(TARGETS["float32_dense"][1], bias is not None, gelu, "float32")

    def forward(x, kernel, *bias):
        flat = x.reshape(-1, x.shape[-1])
        return on_rows(flat, kernel, *bias).reshape(*x.shape[:-1], kernel.shape[1])

    other = differentiated or functools.partial(_xla_form, gelu)
    return differentiated_by(forward, other)(x, kernel, *biases)


def _xla_form(gelu: bool, x, kernel, *bias):
    return xla_dense(x, kernel, bias[0] if bias else None, gelu=gelu)
