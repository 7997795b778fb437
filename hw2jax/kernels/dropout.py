"""Attention dropout from a counter hash: probability (i, j) of sequence b, head h is kept when
a hash of ``seeds[b, h]`` and the counter i * T_k + j is at least rate * 2^32.

The fused CPU kernels (:func:`hw2jax.kernels.cpu_flash_attention`) compute the same hash in
C++, so their backward pass regenerates the forward's mask and no [T, T] mask is stored. XLA's
form (:func:`hw2jax.attention.key_bias_attention`) computes it here, so every path drops the
same entries for the same seeds; it sits in the kernels' layer so that both check their
arguments with one :func:`check`. One (sequence, head) per seed keeps the mask the same however
a mesh splits the batch or the heads.

The hash is lowbias32 (Chris Wellons' integer hash), applied twice:
``mix(mix(counter ^ mix(seed ^ 0x9e3779b9)) ^ seed)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax.errors import InputError


def seeds(rng: jax.Array, batch: int, heads: int) -> jax.Array:
    """One uint32 seed per (sequence, head), drawn from the PRNG key ``rng``."""
    return jax.random.bits(rng, (batch, heads), jnp.uint32)


def threshold(rate: float) -> int:
    """The hash value below which an entry is dropped: rate * 2^32 for rate as float32 (the
    kernels take it as a float32 attribute), rounded, at most 2^32 - 1."""
    return min(2**32 - 1, round(float(np.float32(rate)) * 2.0**32))


def _mix(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def keep_mask(dropout_seeds: jax.Array, t_q: int, t_k: int, rate: float) -> jax.Array:
    """bool [batch, heads, t_q, t_k]: which probabilities dropout keeps."""
    check(rate, dropout_seeds, scores=(t_q, t_k))
    s = dropout_seeds.astype(jnp.uint32)[:, :, None, None]
    key = _mix(s ^ jnp.uint32(0x9E3779B9))
    counters = (
        jnp.arange(t_q, dtype=jnp.uint32)[:, None] * jnp.uint32(t_k)
        + jnp.arange(t_k, dtype=jnp.uint32)[None, :]
    )
    bits = _mix(_mix(counters ^ key) ^ s)
    return bits >= jnp.uint32(threshold(rate))


def apply(probs: jax.Array, dropout_seeds: jax.Array, rate: float) -> jax.Array:
    """probs [batch, heads, t_q, t_k] with dropout: kept entries scaled by 1 / (1 - rate)."""
    keep = keep_mask(dropout_seeds, probs.shape[-2], probs.shape[-1], rate)
    inv_keep = jnp.float32(1.0) / (jnp.float32(1.0) - jnp.float32(rate))
    return jnp.where(keep, probs * inv_keep.astype(probs.dtype), jnp.zeros((), probs.dtype))


def check(
    rate: float,
    dropout_seeds: jax.Array | None,
    shape: tuple | None = None,
    scores: tuple[int, int] = (0, 0),
) -> None:
    """One line naming the problem when the rate or the seeds cannot be used (``shape``: the
    [batch, heads] they must have; ``scores``: (T_q, T_k), whose counters must fit 32 bits)."""
    if not 0.0 <= rate < 1.0:
        raise InputError(f"dropout rate must be in [0, 1), got {rate}.")
    if rate > 0.0 and scores[0] * scores[1] > 2**32:
        raise InputError(
            f"attention dropout over {scores[0]:,} x {scores[1]:,} scores: its counter "
            "i * T_k + j passes 2^32 and the masks would repeat; drop at most 65,536 x 65,536 "
            "scores a call (split the sequence), or set the rate to 0."
        )
    if rate > 0.0 and dropout_seeds is None:
        raise InputError(
            "attention dropout needs seeds, uint32 [batch, heads]: "
            "hw2jax.kernels.dropout.seeds(rng, batch, heads)."
        )
    if dropout_seeds is not None and (
        jnp.ndim(dropout_seeds) != 2 or jnp.result_type(dropout_seeds) != jnp.uint32
    ):
        raise InputError(
            "dropout seeds must be uint32 [batch, heads] "
            "(hw2jax.kernels.dropout.seeds(rng, batch, heads)); got "
            f"{jnp.result_type(dropout_seeds)} {jnp.shape(dropout_seeds)}."
        )
    if dropout_seeds is not None and shape is not None and jnp.shape(dropout_seeds) != shape:
        raise InputError(
            f"dropout seeds must be [batch, heads] = {tuple(shape)}, got "
            f"{jnp.shape(dropout_seeds)}."
        )
