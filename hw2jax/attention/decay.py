"""Linear attention with decay: RetNet's retention (one fixed decay per head, Sun et al. 2023) and
gated linear attention (a data-dependent decay per key dimension, Yang et al. 2024). Both are
causal only, take q, k, v as ``[batch, T, heads, head_dim]``, and come in a recurrent form (a scan
over time) and a chunked one (exact attention inside chunks, a state carried between them);
retention also has the parallel T x T form.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from hw2jax.attention.helpers import as_floating, check_positive_int, check_qkv, pad_axis
from hw2jax.errors import InputError


def retention(
    q: jax.typing.ArrayLike,
    k: jax.typing.ArrayLike,
    v: jax.typing.ArrayLike,
    *,
    gamma: jax.typing.ArrayLike,
    implementation: Literal["chunked", "recurrent", "parallel"] = "chunked",
    chunk_size: int = 64,
) -> jax.Array:
    """out_i = sum_{j <= i} gamma_h^(i - j) (q_i . k_j) v_j, un-normalised (RetNet's retention
    before its group norm); ``gamma`` is one decay in (0, 1] per head, shape [heads]."""
    q, k, v = check_qkv(q, k, v, causal=True)
    gamma = as_floating(gamma, "gamma", 1)
    if gamma.shape != (q.shape[2],):
        raise InputError(
            f"gamma must hold one decay per head, shape ({q.shape[2]},); got {gamma.shape}."
        )
    if not isinstance(gamma, jax.core.Tracer) and not bool(jnp.all((gamma > 0) & (gamma <= 1))):
        raise InputError(f"gamma must lie in (0, 1], got {gamma}.")
    if implementation == "parallel":
        t = q.shape[1]
        steps = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]  # i - j
        decay = jnp.where(steps >= 0, gamma[:, None, None] ** jnp.maximum(steps, 0), 0.0)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * decay.astype(q.dtype)
        return jnp.einsum("bhqk,bkhe->bqhe", scores, v)
    # Retention is gated linear attention with one log decay shared by all key dimensions:
    # kept as a single column, the chunked form's pairwise decays are [C, C], not [C, C, D].
    log_alpha = jnp.broadcast_to(jnp.log(gamma)[:, None], (*q.shape[:3], 1)).astype(q.dtype)
    return _gla(q, k, v, log_alpha, implementation, chunk_size, "chunked, recurrent or parallel")


def retention_decays(heads: int) -> jax.Array:
    """RetNet's per-head decays, gamma_h = 1 - 2^(-5 - h)."""
    check_positive_int(heads, "heads")
    return 1.0 - 2.0 ** (-5.0 - jnp.arange(heads, dtype=jnp.float32))


def bidirectional_retention(
    q: jax.typing.ArrayLike, k: jax.typing.ArrayLike, v: jax.typing.ArrayLike
) -> jax.Array:
    """Retention without its causal mask, as an encoder over unordered tokens needs (a ViT's
    patches): out_i = sum_j gamma_h^|i - j| (q_i . k_j) v_j / sqrt(d), with RetNet's decays
    (:func:`retention_decays`). The parallel T x T form: such encoders see few tokens."""
    q, k, v = check_qkv(q, k, v, causal=False)
    t, h = q.shape[1], q.shape[2]
    distance = jnp.abs(jnp.arange(t)[:, None] - jnp.arange(t)[None, :])
    decay = (retention_decays(h)[:, None, None] ** distance).astype(q.dtype)  # [h, t, t]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]) * decay
    return jnp.einsum("bhqk,bkhe->bqhe", scores, v)


def _gla(q, k, v, log_alpha, implementation: str, chunk_size: int, choices: str) -> jax.Array:
    """The recurrent or chunked form, for log_alpha [B, T, H, D] or one column [B, T, H, 1]."""
    if implementation == "recurrent":
        return _gla_recurrent(q, k, v, log_alpha)
    if implementation != "chunked":
        raise InputError(f"unknown implementation {implementation!r}; choose {choices}.")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}.")
    return _gla_chunked(q, k, v, log_alpha, min(chunk_size, q.shape[1]))


def gated_linear_attention(
    q: jax.typing.ArrayLike,
    k: jax.typing.ArrayLike,
    v: jax.typing.ArrayLike,
    log_alpha: jax.typing.ArrayLike,
    *,
    implementation: Literal["chunked", "recurrent"] = "chunked",
    chunk_size: int = 16,
) -> jax.Array:
    """S_t = diag(alpha_t) S_(t-1) + k_t v_t^T, out_t = S_t^T q_t, with alpha_t = exp(log_alpha_t)
    per key dimension (``log_alpha`` [batch, T, heads, head_dim], <= 0), or one decay per head
    and step for all key dimensions (``log_alpha`` [batch, T, heads]: Mamba-2's SSD form).

    The chunked form never exponentiates a positive number: inside a chunk each pair (t, j) gets
    exp(b_t - b_j) with b the running sum of log_alpha, and the state is carried between chunks
    with exp(b_end - b_j); so it stays finite for log_alpha down to -20 per step and beyond, at
    O(T * chunk_size * head_dim) memory.
    """
    q, k, v = check_qkv(q, k, v, causal=True)
    log_alpha = jnp.asarray(log_alpha)
    if log_alpha.ndim == 3:  # one column: the chunked form's pairwise decays stay [C, C]
        log_alpha = log_alpha[..., None]
    log_alpha = as_floating(log_alpha, "log_alpha", 4)
    if log_alpha.shape not in (k.shape, (*k.shape[:3], 1)):
        raise InputError(
            f"log_alpha must have k's shape {k.shape} (a decay per key dimension) or "
            f"{k.shape[:3]} (one per head), got {log_alpha.shape}."
        )
    if not isinstance(log_alpha, jax.core.Tracer) and bool(jnp.any(log_alpha > 0)):
        raise InputError(
            f"log_alpha must be <= 0 (decays exp(log_alpha) in (0, 1]), got a maximum of "
            f"{float(jnp.max(log_alpha)):.4g}; make it with jax.nn.log_sigmoid, as GLA does."
        )
    return _gla(q, k, v, log_alpha, implementation, chunk_size, "chunked or recurrent")


def _time_major(*xs):
    return tuple(jnp.moveaxis(x, 1, 0) for x in xs)


def _gla_recurrent(q, k, v, log_alpha):
    b, _, h, d = k.shape
    s0 = jnp.zeros((b, h, d, v.shape[-1]), jnp.result_type(q, v))

    def step(s, inputs):
        q_t, k_t, v_t, a_t = inputs
        s = jnp.exp(a_t)[..., None] * s + k_t[..., :, None] * v_t[..., None, :]
        return s, jnp.einsum("bhd,bhde->bhe", q_t, s)

    _, out = jax.lax.scan(step, s0, _time_major(q, k, v, log_alpha))
    return jnp.moveaxis(out, 0, 1)


def _gla_chunked(q, k, v, log_alpha, chunk):
    b, t, h, d = k.shape
    e = v.shape[-1]
    n = -(-t // chunk)
    # Zeros after the last step: never seen.
    q, k, v, log_alpha = (pad_axis(a, 1, n * chunk) for a in (q, k, v, log_alpha))

    def blocks(x):  # [B, n*C, H, X] -> [n, B, H, C, X]
        return jnp.moveaxis(x.reshape(b, n, chunk, h, x.shape[-1]), (1, 3), (0, 2))

    qc, kc, vc, ac = (blocks(a) for a in (q, k, v, log_alpha))
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))

    def chunk_step(s, inputs):
        qi, ki, vi, ai = inputs  # [B, H, C, D]
        cum = jnp.cumsum(ai, axis=2)  # b_t, running log decay inside the chunk
        # exp(b_t - b_j) for j <= t: exponents <= 0 only, masked before exponentiating.
        diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # [B, H, C(t), C(j), D or 1]
        decay = jnp.exp(jnp.where(causal[:, :, None], diff, -jnp.inf))
        if decay.shape[-1] == 1:  # one decay for all key dimensions (retention)
            scores = jnp.einsum("bhtd,bhjd->bhtj", qi, ki) * decay[..., 0]
        else:
            scores = jnp.einsum("bhtd,bhjd,bhtjd->bhtj", qi, ki, decay)
        out = jnp.einsum("bhtj,bhje->bhte", scores, vi)
        out = out + jnp.einsum("bhtd,bhde->bhte", qi * jnp.exp(cum), s)
        to_end = jnp.exp(cum[:, :, -1:, :] - cum)  # exp(b_end - b_j) <= 1
        s = jnp.exp(cum[:, :, -1, :])[..., None] * s + jnp.einsum(
            "bhjd,bhje->bhde", ki * to_end, vi
        )
        return s, out

    s0 = jnp.zeros((b, h, d, e), jnp.result_type(q, v))
    _, out = jax.lax.scan(chunk_step, s0, (qc, kc, vc, ac))  # [n, B, H, C, E]
    out = jnp.moveaxis(out, (0, 2), (1, 3)).reshape(b, n * chunk, h, e)
    return out[:, :t]
