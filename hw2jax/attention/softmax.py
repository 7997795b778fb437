"""Softmax (scaled dot-product) attention, building the T x T scores."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from hw2jax.attention.blockwise import blockwise_softmax_attention
from hw2jax.attention.helpers import check_qkv, matmul_f32


def softmax_attention(
    q: jax.typing.ArrayLike,
    k: jax.typing.ArrayLike,
    v: jax.typing.ArrayLike,
    *,
    causal: bool = False,
    implementation: Literal["auto", "naive", "blockwise"] = "auto",
) -> jax.Array:
    """Scaled dot-product attention, softmax(q k^T / sqrt(d)) v.

    ``"naive"`` builds the T x T matrix (O(T^2) memory); ``"blockwise"`` is
    :func:`blockwise_softmax_attention` (O(T) memory, same result); ``"auto"`` picks
    blockwise once the score matrix would pass 2^26 entries per head and batch (T = 8192).
    """
    q, k, v = check_qkv(q, k, v, causal)
    if implementation not in ("auto", "naive", "blockwise"):
        raise ValueError(
            f"unknown implementation {implementation!r}; use auto, naive or blockwise."
        )
    if implementation == "blockwise" or (
        implementation == "auto" and q.shape[1] * k.shape[1] >= 2**26
    ):
        return blockwise_softmax_attention(q, k, v, causal=causal)
    q = q * (1.0 / math.sqrt(q.shape[-1]))
    # Heads moved next to the batch before the matmuls: XLA's CPU dot is much faster with the
    # batch dims leading than on the einsum "bqhd,bkhd->bhqk" (benchmarks/NOTES.md).
    qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
    logits = matmul_f32(qh, kh, transpose_b=True)
    if causal:
        t = q.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = matmul_f32(weights, vh).astype(v.dtype)
    return jnp.swapaxes(out, 1, 2)
