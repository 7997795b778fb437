"""BERT's attention as XLA computes it: scores with a per-key bias (the padding mask)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from hw2jax.attention import matmul_f32


def key_bias_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_bias: jax.Array | None,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """softmax(q.k^T + key_bias) v as XLA computes it (BERT's attention): [B, T, heads, D] in
    and out, q already scaled, key_bias [B, T] added to each key's scores (None: no mask);
    ``dropout`` is applied to the probabilities. Heads next to the batch (see matmul_f32):
    faster on CPU than einsums over [B, T, heads, D]; scaling q, inside the copy that
    moves the heads, spares a pass over the T x T scores."""
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    scores = matmul_f32(q, k, transpose_b=True)
    if key_bias is not None:
        scores = scores + key_bias[:, None, None, :]
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.swapaxes(matmul_f32(probs.astype(v.dtype), v), 1, 2)
