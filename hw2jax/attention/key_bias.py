"""BERT's attention: softmax scores with a per-key bias (the padding mask), by XLA or by the
fused CPU row kernel with the XLA formula's gradient."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from hw2jax import kernels
from hw2jax.attention import dispatch
from hw2jax.attention.helpers import check_qkv, matmul_f32
from hw2jax.errors import InputError

IMPLEMENTATIONS = dispatch.KEY_BIAS


def key_bias_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_bias: jax.Array | None = None,
    *,
    scale: float = 1.0,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """softmax(scale q.k^T + key_bias) v: [B, T, heads, D] in and out, key_bias [B, T] added to
    each key's scores (None: no mask); ``dropout`` is applied to the probabilities.

    ``implementation``: ``"xla"`` (heads next to the batch: faster on CPU than einsums over
    [B, T, heads, D]; pass q already scaled and ``scale=1`` to spare a pass over the T x T
    scores), ``"fused_cpu"`` (the row kernel, :func:`hw2jax.kernels.cpu_attention`, float32,
    or for bf16 on AMX tiles :func:`hw2jax.kernels.amx_attention`; no dropout, since it keeps
    no probabilities; gradients by the XLA formula) or ``"auto"``
    (:func:`hw2jax.attention.dispatch.key_bias`).
    """
    q, k, v = check_qkv(q, k, v, causal=False)
    if key_bias is not None and jnp.shape(key_bias) != (k.shape[0], k.shape[1]):
        raise InputError(
            f"key_bias must be [batch, T_k] = {k.shape[:2]}, one value per key, got shape "
            f"{jnp.shape(key_bias)}."
        )
    paths = timed_paths(q.shape, q.dtype, scale)
    implementation = resolve(implementation, q.shape[-1], dropout is not None, measure=paths)
    if implementation == "fused_cpu":
        if key_bias is None:
            key_bias = jnp.zeros(q.shape[:2], jnp.float32)
        key_bias = key_bias.astype(jnp.float32)
        path = dispatch.bf16_row_attention(q.shape, q.dtype, kernels.amx_matmul_unavailable_reason)
        fused = _fused_amx if path == "amx" else _upcast_fused
        return fused(q, k, v, key_bias, float(scale))
    return _xla(q * scale if scale != 1.0 else q, k, v, key_bias, dropout)


def resolve(
    implementation: str,
    head_dim: int,
    dropout_active: bool,
    what: str = "key_bias_attention",
    measure: dispatch.Measure | None = None,
) -> str:
    """ "xla" or "fused_cpu": the dispatch rule's choice for "auto" (timed where ``measure`` is
    given), else the name given, checked (``what`` names the caller in the message)."""
    reason = functools.partial(fused_unavailable, head_dim, dropout_active)
    return dispatch.resolve_fused(
        implementation,
        IMPLEMENTATIONS,
        what,
        reason,
        lambda: dispatch.key_bias(reason, measure=measure),
        "implementation='auto' or 'xla'" + (" (or deterministic=True)" if dropout_active else ""),
    )


def timed_paths(shape: tuple, dtype, scale: float) -> dispatch.Measure:
    """The paths auto times for q, k and v of ``shape`` and ``dtype`` ([B, T, heads, D]): the
    fused kernel (bf16 on AMX tiles, or upcast) or XLA's form, on them as they are."""
    qkv = jax.ShapeDtypeStruct(shape, dtype)
    bias = jax.ShapeDtypeStruct(shape[:2], jnp.float32)

    def run(path: str):
        def attend(q, k, v, key_bias):
            return key_bias_attention(q, k, v, key_bias, scale=scale, implementation=path)

        return attend

    return dispatch.Measure((qkv, qkv, qkv, bias), run)


def fused_unavailable(head_dim: int, dropout_active: bool) -> str | None:
    """Why the row kernel cannot run BERT's attention here (None: it can)."""
    if dropout_active:
        return "attention dropout needs the probabilities, which the fused kernel never stores"
    return kernels.cpu_attention_unavailable_reason(head_dim, jnp.float32)


def _xla(q, k, v, key_bias, dropout):
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    scores = matmul_f32(q, k, transpose_b=True)
    if key_bias is not None:
        scores = scores + key_bias[:, None, None, :]
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.swapaxes(matmul_f32(probs.astype(v.dtype), v), 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(q, k, v, key_bias, scale):
    return kernels.cpu_attention(q, k, v, key_bias, scale=scale)


def _fused_fwd(q, k, v, key_bias, scale):
    return _fused(q, k, v, key_bias, scale), (q, k, v, key_bias)


def _fused_bwd(scale, residuals, grad):
    # The gradient of the same function as XLA computes it.
    _, pullback = jax.vjp(
        lambda q, k, v, key_bias: _xla(q * scale, k, v, key_bias, None), *residuals
    )
    return pullback(grad)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _upcast_fused(q, k, v, key_bias, scale):
    """The float32 row kernel on q, k, v upcast (as they are when already float32)."""
    return _fused(*(t.astype(jnp.float32) for t in (q, k, v)), key_bias, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_amx(q, k, v, key_bias, scale):
    return kernels.amx_attention(q, k, v, key_bias, scale=scale)


def _fused_amx_fwd(q, k, v, key_bias, scale):
    # Differentiated, the step runs the float32 kernel (and its gradient) on q, k, v upcast.
    return jax.vjp(functools.partial(_upcast_fused, scale=scale), q, k, v, key_bias)


_fused_amx.defvjp(_fused_amx_fwd, lambda scale, vjp, g: vjp(g))
