"""Exact softmax attention in O(T) memory: an online softmax over key blocks (the
flash-attention algorithm in plain JAX), with its own backward pass."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from hw2jax.attention.helpers import check_qkv, matmul_f32
from hw2jax.errors import InputError


def blockwise_softmax_attention(
    q: jax.typing.ArrayLike,
    k: jax.typing.ArrayLike,
    v: jax.typing.ArrayLike,
    *,
    causal: bool = False,
    block_size: int = 512,
) -> jax.Array:
    """Exact softmax attention with an online softmax over key blocks (the flash-attention
    algorithm in plain JAX): O(T) memory in the forward and the backward pass, which
    recomputes the scores block by block instead of storing them."""
    q, k, v = check_qkv(q, k, v, causal)
    if block_size < 1:
        raise InputError(f"block_size must be >= 1, got {block_size}.")
    t_q, t_k = q.shape[1], k.shape[1]
    bq, bk = min(block_size, t_q), min(block_size, t_k)
    # Work in [B, H, T, D] (heads next to the batch) so every block product is a plain
    # batched matmul: on CPU that is much faster than einsums over [B, T, H, D].
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
    pad = lambda a, n: jnp.pad(a, ((0, 0), (0, 0), (0, n), (0, 0)))  # noqa: E731
    q, k, v = pad(q, -t_q % bq), pad(k, -t_k % bk), pad(v, -t_k % bk)
    out = _flash(q, k, v, (causal, bq, bk, t_k))
    return jnp.swapaxes(out[:, :, :t_q], 1, 2)


def _blocks(x: jax.Array, size: int) -> jax.Array:
    """[B, H, T, ...] -> [T/size, B, H, size, ...], block index first for scanning."""
    b, h, t, *rest = x.shape
    return jnp.moveaxis(x.reshape(b, h, t // size, size, *rest), 2, 0)


def _unblock(x: jax.Array) -> jax.Array:
    n, b, h, size, *rest = x.shape
    return jnp.moveaxis(x, 0, 2).reshape(b, h, n * size, *rest)


def _block_scores(qi, kj, i, j, static):
    """Scaled scores [B, H, bq, bk] of query block i and key block j, masked with -inf."""
    causal, bq, bk, t_k = static
    s = matmul_f32(qi, kj, transpose_b=True)
    if not causal and t_k % bk == 0:
        return s  # nothing to mask: skip a pass over the block
    k_pos = j * bk + jnp.arange(bk)
    valid = (k_pos < t_k)[None, :]
    if causal:
        valid = valid & (k_pos[None, :] <= (i * bq + jnp.arange(bq))[:, None])
    return jnp.where(valid, s, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, static):
    return _flash_fwd(q, k, v, static)[0]


def _key_range(i, static, n_k: int):
    """Key blocks [0, hi) that query block i can see: all of them, or with ``causal`` only
    those that start at or before its last query (the rest are fully masked: skipped)."""
    causal, bq, bk, _ = static
    return n_k if not causal else jnp.minimum(((i + 1) * bq - 1) // bk + 1, n_k)


def _query_range_start(j, static):
    """The first query block that can see key block j (0 unless ``causal``)."""
    causal, bq, bk, _ = static
    return 0 if not causal else (j * bk) // bq


def _flash_fwd(q, k, v, static):
    """q, k, v in [B, H, T, D], T padded to whole blocks."""
    causal, bq, bk, _ = static
    scale = 1.0 / math.sqrt(q.shape[-1])
    kb, vb = _blocks(k, bk), _blocks(v, bk)

    def query_block(args):
        qi, i = args
        qi = qi * scale

        def key_block(carry, kj, vj, j):
            m, denom, acc = carry
            s = _block_scores(qi, kj, i, j, static)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            denom = denom * corr + p.sum(-1)
            acc = acc * corr[..., None] + matmul_f32(p.astype(vj.dtype), vj)
            return m_new, denom, acc

        b, h = qi.shape[:2]
        init = (
            jnp.full((b, h, bq), -jnp.inf),
            jnp.zeros((b, h, bq)),
            jnp.zeros((b, h, bq, v.shape[-1])),
        )
        if causal:  # a loop of dynamic length: the key blocks after the diagonal are skipped
            hi = _key_range(i, static, kb.shape[0])
            step = lambda j, c: key_block(c, kb[j], vb[j], j)  # noqa: E731
            m, denom, acc = jax.lax.fori_loop(0, hi, step, init)
        else:  # a scan over the blocks: faster here than the same fori_loop
            step = lambda c, xs: (key_block(c, *xs), None)  # noqa: E731
            (m, denom, acc), _ = jax.lax.scan(step, init, (kb, vb, jnp.arange(kb.shape[0])))
        return (acc / denom[..., None]).astype(v.dtype), m + jnp.log(denom)

    qb = _blocks(q, bq)
    out, lse = jax.lax.map(query_block, (qb, jnp.arange(qb.shape[0])))
    return _unblock(out), (q, k, v, _unblock(out), lse)


def _flash_bwd(static, res, d_out):
    _, bq, bk, _ = static
    q, k, v, out, lse = res  # lse: [nq, B, H, bq]
    scale = 1.0 / math.sqrt(q.shape[-1])
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, H, T]
    qb, dob, deltab = _blocks(q * scale, bq), _blocks(d_out, bq), _blocks(delta, bq)
    nq = qb.shape[0]

    def key_block(dq, xs):
        kj, vj, j = xs

        def query_block(i, carry):
            dq, dk, dv = carry
            qi, doi, lse_i, delta_i = qb[i], dob[i], lse[i], deltab[i]
            s = _block_scores(qi, kj, i, j, static)
            p = jnp.exp(s - lse_i[..., None])  # the forward's probabilities, recomputed
            dv = dv + matmul_f32(p, doi.astype(jnp.float32), transpose_a=True)
            ds = p * (matmul_f32(doi, vj, transpose_b=True) - delta_i[..., None])
            dk = dk + matmul_f32(ds, qi.astype(jnp.float32), transpose_a=True)
            return dq.at[i].add(matmul_f32(ds, kj.astype(jnp.float32))), dk, dv

        zeros = (jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32))
        lo = _query_range_start(j, static)
        dq, dk, dv = jax.lax.fori_loop(lo, nq, query_block, (dq, *zeros))
        return dq, (dk, dv)

    kb, vb = _blocks(k, bk), _blocks(v, bk)
    dq, (dk, dv) = jax.lax.scan(
        key_block, jnp.zeros(qb.shape, jnp.float32), (kb, vb, jnp.arange(kb.shape[0]))
    )
    return (
        (_unblock(dq) * scale).astype(q.dtype),
        _unblock(dk).astype(k.dtype),
        _unblock(dv).astype(v.dtype),
    )


_flash.defvjp(_flash_fwd, _flash_bwd)
