"""Sliding-window softmax attention: each query attends to the last ``window`` keys, itself
included (Mistral's and Based's local attention). Exact, causal, in O(T * window) memory: the
queries go in blocks of ``window``, and each block sees its own keys and the block before."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from hw2jax.attention.helpers import check_qkv, pad_axis
from hw2jax.errors import InputError


def sliding_window_attention(
    q: jax.typing.ArrayLike, k: jax.typing.ArrayLike, v: jax.typing.ArrayLike, *, window: int
) -> jax.Array:
    """out_i = sum_{i - window < j <= i} softmax_j(q_i . k_j / sqrt(d)) v_j; [batch, T, heads, d]
    in, [batch, T, heads, d_v] out."""
    q, k, v = check_qkv(q, k, v, causal=True)
    if not isinstance(window, int) or window < 1:
        raise InputError(f"window must be a positive int, got {window!r}.")
    b, t, h, d = q.shape
    w = min(window, t)
    n = -(-t // w)
    q, k, v = (pad_axis(x, 1, n * w) for x in (q, k, v))

    def blocks(x):  # [B, n*w, H, X] -> [B, H, n, w, X]
        return jnp.moveaxis(x.reshape(b, n, w, h, x.shape[-1]), 3, 1)

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    # Each block's keys: the block before (zeros before the first) and its own, [B, H, n, 2w, X].
    previous = lambda x: jnp.pad(x, ((0, 0), (0, 0), (1, 0), (0, 0), (0, 0)))[:, :, :-1]  # noqa: E731
    keys = jnp.concatenate([previous(kb), kb], axis=3)
    values = jnp.concatenate([previous(vb), vb], axis=3)
    scores = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, keys) / math.sqrt(d)
    # Query i of block m is step m*w + i; key j of its 2w keys is step (m-1)*w + j.
    distance = (jnp.arange(w)[:, None] + w) - jnp.arange(2 * w)[None, :]  # i - j in steps
    block = jnp.arange(n)[:, None, None]
    visible = (distance >= 0) & (distance < window) & ((block > 0) | (jnp.arange(2 * w) >= w))
    scores = jnp.where(visible, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhnqk,bhnke->bhnqe", weights, values)
    return jnp.moveaxis(out, 1, 3).reshape(b, n * w, h, -1)[:, :t]
