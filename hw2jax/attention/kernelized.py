"""Linear attention with other feature maps: cosFormer's cos re-weighting (Qin et al. 2022) and
Performer's FAVOR+ positive random features for the softmax kernel (Choromanski et al. 2021).
Both reuse linear attention's O(T) products (:func:`hw2jax.attention.linear.linear_products`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from hw2jax.attention.helpers import as_floating, check_key, check_positive_int, check_qkv
from hw2jax.attention.linear import linear_products, normalise
from hw2jax.errors import InputError


def cosformer_attention(
    q: jax.typing.ArrayLike,
    k: jax.typing.ArrayLike,
    v: jax.typing.ArrayLike,
    *,
    causal: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> jax.Array:
    """Weights relu(q_i) . relu(k_j) cos(pi/2 (i - j) / M) with M = T, normalised per query.
    cos(a - b) = cos a cos b + sin a sin b splits the weight into two feature products, so the
    whole stays O(T): features [relu(x) cos(pi i / 2M), relu(x) sin(pi i / 2M)]."""
    q, k, v = check_qkv(q, k, v, causal)
    t = q.shape[1]
    angle = (jnp.pi / 2) * jnp.arange(t, dtype=q.dtype) / t

    def features(x):
        x = jax.nn.relu(x)
        cos, sin = (f(angle)[None, :, None, None] for f in (jnp.cos, jnp.sin))
        return jnp.concatenate([x * cos, x * sin], axis=-1)

    num, den = linear_products(
        features(q), features(k), v, causal=causal, implementation="chunked", chunk_size=chunk_size
    )
    return normalise(num, den + eps)


def performer_projection(
    key: jax.Array, num_features: int, dim: int, orthogonal: bool = True
) -> jax.Array:
    """FAVOR+'s random matrix [num_features, dim]: Gaussian rows, or blocks of ``dim`` orthogonal
    rows each rescaled to a Gaussian vector's length (lower variance, same expectation)."""
    check_key(key)
    check_positive_int(num_features, "num_features")
    check_positive_int(dim, "dim")
    if not orthogonal:
        return jax.random.normal(key, (num_features, dim))
    blocks = []
    keys = jax.random.split(key, 2 * (-(-num_features // dim)))
    for i in range(0, len(keys), 2):
        g = jax.random.normal(keys[i], (dim, dim))
        qmat, _ = jnp.linalg.qr(g)
        norms = jnp.linalg.norm(jax.random.normal(keys[i + 1], (dim, dim)), axis=1)
        blocks.append(qmat.T * norms[:, None])
    return jnp.concatenate(blocks)[:num_features]


def performer_features(x: jax.Array, projection: jax.Array, *, is_query: bool) -> jax.Array:
    """phi(x) = exp(w . x' - |x'|^2 / 2) / sqrt(m), x' = x / d^(1/4): E[phi(q) . phi(k)] =
    exp(q . k / sqrt(d)). A max is subtracted before exp (per query row; over all keys), which
    scales numerator and denominator alike and keeps exp finite."""
    x, projection = as_floating(x, "x", 4), as_floating(projection, "projection", 2)
    if x.ndim != 4 or projection.ndim != 2 or projection.shape[1] != x.shape[-1]:
        raise InputError(
            "performer_features needs x [batch, T, heads, head_dim] and projection "
            f"[num_features, head_dim], got {x.shape} and {projection.shape}."
        )
    x = x / x.shape[-1] ** 0.25
    proj = jnp.einsum("bthd,md->bthm", x, projection)
    stab = (
        jnp.max(proj, axis=-1, keepdims=True)
        if is_query
        else jnp.max(proj, axis=(1, 3), keepdims=True)
    )
    stab = jax.lax.stop_gradient(stab)
    sq = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
    return jnp.exp(proj - sq - stab) / math.sqrt(projection.shape[0])


def performer_attention(
    q: jax.typing.ArrayLike,
    k: jax.typing.ArrayLike,
    v: jax.typing.ArrayLike,
    *,
    causal: bool = False,
    num_features: int = 256,
    key: jax.Array,
    orthogonal: bool = True,
    chunk_size: int = 64,
) -> jax.Array:
    """FAVOR+: softmax attention estimated with ``num_features`` positive random features
    drawn from ``key`` (unbiased in the kernel, consistent in the output as the number of
    features grows), in O(T). The features are positive, so the denominator is too: no eps is
    added (it would not scale with the stabilisers and would bias the result)."""
    q, k, v = check_qkv(q, k, v, causal)
    projection = performer_projection(key, num_features, q.shape[-1], orthogonal).astype(q.dtype)
    fq = performer_features(q, projection, is_query=True)
    fk = performer_features(k, projection, is_query=False)
    num, den = linear_products(
        fq, fk, v, causal=causal, implementation="chunked", chunk_size=chunk_size
    )
    return normalise(num, jnp.maximum(den, jnp.finfo(den.dtype).tiny))
