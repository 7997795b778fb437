"""The delta rule (DeltaNet, Schlag et al. 2021; Yang et al. 2024) and its gated form (Gated
DeltaNet, Yang et al. 2024b): a causal linear attention whose state is corrected, not only
added to, at each step:

    S_t = alpha_t S_(t-1) (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,    o_t = S_t q_t,

with S_t of shape [d_v, d_k], S_0 = 0 and alpha_t = 1 without gates. q, k: [batch, T, heads, d_k];
v: [batch, T, heads, d_v]; beta, log_alpha: [batch, T, heads]. No normalisation happens inside:
callers L2-normalise k (and q) as DeltaNet does, which keeps I - beta k k^T a contraction.

Two forms: ``recurrent`` (a scan over time, the state in memory at each step) and ``chunked``
(the WY/UT form of Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length"): inside a chunk of C steps the corrections u_t = S_t - alpha_t S_(t-1) applied
to k_t solve one unit lower-triangular system, (I + diag(beta) L) U = diag(beta) (V - diag(g) K
S^T), with L[t, j] = (g_t / g_j) k_t . k_j for j < t and g the running product of alpha
(inverted by :func:`unit_lower_inverse`); so a chunk is a few [C, C] and [C, d] products and the
state passes between chunks only, in O(T * C + T * d) memory.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from hw2jax.attention.helpers import as_floating, check_qkv, pad_axis
from hw2jax.errors import InputError


def delta_rule_attention(
    q: jax.typing.ArrayLike,
    k: jax.typing.ArrayLike,
    v: jax.typing.ArrayLike,
    beta: jax.typing.ArrayLike,
    *,
    log_alpha: jax.typing.ArrayLike | None = None,
    implementation: Literal["chunked", "recurrent"] = "chunked",
    chunk_size: int = 64,
) -> jax.Array:
    """o_t = S_t q_t under the (gated) delta rule above; ``log_alpha`` (<= 0) gives Gated
    DeltaNet, None plain DeltaNet. Returns [batch, T, heads, d_v]."""
    q, k, v = check_qkv(q, k, v, causal=True)
    beta = as_floating(beta, "beta", 3)
    if beta.shape != q.shape[:3]:
        raise InputError(
            f"beta must hold one write strength per step and head, shape {q.shape[:3]}; got "
            f"{beta.shape}."
        )
    if log_alpha is None:
        log_alpha = jnp.zeros_like(beta)
    log_alpha = as_floating(log_alpha, "log_alpha", 3)
    if log_alpha.shape != q.shape[:3]:
        raise InputError(
            f"log_alpha must hold one log decay per step and head, shape {q.shape[:3]}; got "
            f"{log_alpha.shape} (a decay per key dimension is gated_linear_attention's)."
        )
    if implementation == "recurrent":
        return _recurrent(q, k, v, beta, log_alpha)
    if implementation != "chunked":
        raise InputError(f"unknown implementation {implementation!r}; choose chunked or recurrent.")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}.")
    return _chunked(q, k, v, beta, log_alpha, min(chunk_size, q.shape[1]))


def _recurrent(q, k, v, beta, log_alpha):
    b, _, h, dk = k.shape
    s0 = jnp.zeros((b, h, v.shape[-1], dk), jnp.result_type(q, v))

    def step(s, inputs):
        q_t, k_t, v_t, beta_t, a_t = inputs  # [B, H, d] and [B, H]
        s = jnp.exp(a_t)[..., None, None] * s
        error = v_t - jnp.einsum("bhek,bhk->bhe", s, k_t)  # v_t - alpha_t S_(t-1) k_t
        s = s + beta_t[..., None, None] * error[..., :, None] * k_t[..., None, :]
        return s, jnp.einsum("bhek,bhk->bhe", s, q_t)

    inputs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, log_alpha))
    _, out = jax.lax.scan(step, s0, inputs)
    return jnp.moveaxis(out, 0, 1)


def _chunked(q, k, v, beta, log_alpha, chunk):
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    n = -(-t // chunk)
    # Steps after the last one get beta = 0 and log_alpha = 0: they change nothing.
    q, k, v, beta, log_alpha = (pad_axis(a, 1, n * chunk) for a in (q, k, v, beta, log_alpha))

    def blocks(x):  # [B, n*C, H, ...] -> [n, B, H, C, ...]
        x = x.reshape(b, n, chunk, h, *x.shape[3:])
        return jnp.moveaxis(x, (1, 3), (0, 2))

    qc, kc, vc, bc, ac = (blocks(a) for a in (q, k, v, beta, log_alpha))
    strict = jnp.tril(jnp.ones((chunk, chunk), bool), -1)
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    eye = jnp.eye(chunk, dtype=q.dtype)

    def chunk_step(s, inputs):
        qi, ki, vi, bi, ai = inputs  # [B, H, C, d] and [B, H, C]
        g = jnp.cumsum(ai, axis=-1)  # log of the running decay inside the chunk
        diff = g[..., :, None] - g[..., None, :]  # log(g_t / g_j), <= 0 where j <= t
        decay = jnp.exp(jnp.where(causal, diff, -jnp.inf))  # masked before exponentiating
        kk = jnp.einsum("bhtd,bhjd->bhtj", ki, ki) * decay
        system = eye + bi[..., :, None] * jnp.where(strict, kk, 0.0)  # I + diag(beta) L
        rhs_v = bi[..., None] * vi
        rhs_k = (bi * jnp.exp(g))[..., None] * ki
        solved = unit_lower_inverse(system) @ jnp.concatenate([rhs_v, rhs_k], -1)
        u = solved[..., :dv] - jnp.einsum("bhtk,bhek->bhte", solved[..., dv:], s)  # U = U~ - W S^T
        scores = jnp.einsum("bhtd,bhjd->bhtj", qi, ki) * decay
        out = jnp.exp(g)[..., None] * jnp.einsum("bhtk,bhek->bhte", qi, s)
        out = out + jnp.einsum("bhtj,bhje->bhte", scores, u)
        to_end = jnp.exp(g[..., -1:] - g)  # g_C / g_j <= 1
        s = jnp.exp(g[..., -1])[..., None, None] * s + jnp.einsum(
            "bhje,bhjk->bhek", u * to_end[..., None], ki
        )
        return s, out

    s0 = jnp.zeros((b, h, dv, dk), jnp.result_type(q, v))
    _, out = jax.lax.scan(chunk_step, s0, (qc, kc, vc, bc, ac))  # [n, B, H, C, dv]
    out = jnp.moveaxis(out, (0, 2), (1, 3)).reshape(b, n * chunk, h, dv)
    return out[:, :t]


def unit_lower_inverse(m: jax.Array) -> jax.Array:
    """The inverse of unit lower-triangular matrices [..., C, C], by recursive doubling: the
    inverses of the diagonal blocks of size s give those of size 2s, [[A, 0], [L, B]]^-1 =
    [[A^-1, 0], [-B^-1 L A^-1, B^-1]]. Matmuls only: no LAPACK call (whose CPU kernel
    deadlocked inside XLA's scan here) and no Neumann series (whose powers overflow)."""
    c = m.shape[-1]
    size = 1 << max(c - 1, 0).bit_length()
    batch = m.shape[:-2]
    if size != c:  # pad to a power of two with an identity block, sliced off at the end
        pad = [(0, 0)] * len(batch) + [(0, size - c), (0, size - c)]
        m = jnp.pad(m, pad) + jnp.diag(jnp.arange(size) >= c).astype(m.dtype)
    inverse = jnp.ones((*batch, size, 1, 1), m.dtype)  # the 1 x 1 diagonal blocks
    s = 1
    while s < size:
        n = size // (2 * s)
        blocks = m.reshape(*batch, n, 2 * s, n, 2 * s)
        diagonal = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [n, 2s, 2s]
        pairs = inverse.reshape(*batch, n, 2, s, s)
        a, b = pairs[..., 0, :, :], pairs[..., 1, :, :]
        lower = -b @ diagonal[..., s:, :s] @ a
        top = jnp.concatenate([a, jnp.zeros_like(a)], -1)
        inverse = jnp.concatenate([top, jnp.concatenate([lower, b], -1)], -2)
        s *= 2
    return inverse.reshape(*batch, size, size)[..., :c, :c]


def l2_normalise(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / |x| over the last axis: DeltaNet's normalisation of q and k."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
