"""Causal linear attention's chunk algorithm as a Pallas kernel, forward and backward.

The chunk algorithm: exact attention inside a chunk (a masked [C, C] product) plus the state
S = sum_j fk_j v_j^T and z = sum_j fk_j of the chunks before it. The states are one batched
product and a prefix sum over chunks (XLA); the kernel then runs one program per
(batch, head, chunk), all independent, so a GPU is filled even at batch 1 with few heads, and
no [T, T] matrix nor a stack of T states is stored. The backward pass is the same shape: the
sums over the chunks after each one, R = sum_i fq_i g_i^T and r = sum_i fq_i g_den_i, then one
program per chunk for d fq, d fk and d v.

On a GPU the kernel is compiled with Triton; elsewhere it runs in Pallas's interpret mode
(slow: it exists there so that tests cover the same code).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from hw2jax.attention.helpers import pad_axis, sum_after, sum_before

_F32 = jnp.float32


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _causal_mask(chunk: int) -> jax.Array:
    rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    return rows >= cols


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=_F32)


def _load(*refs):
    return tuple(r[...].astype(_F32) for r in refs)


def _forward_kernel(fq_ref, fk_ref, v_ref, state_ref, z_ref, num_ref, den_ref):
    q, k, v, state, z = _load(fq_ref, fk_ref, v_ref, state_ref, z_ref)
    scores = jnp.where(_causal_mask(q.shape[0]), _dot(q, k.T), 0.0)
    num_ref[...] = (_dot(scores, v) + _dot(q, state)).astype(num_ref.dtype)
    den_ref[...] = (jnp.sum(scores, axis=1) + jnp.sum(q * z[None, :], axis=1)).astype(den_ref.dtype)


def _backward_kernel(*refs):
    """refs: fq, fk, v, g_num, g_den (chunk rows), state, z, later, later_den (per chunk),
    then the outputs d fq, d fk, d v."""
    q, k, v, g, g_den, state, z, later, later_den = _load(*refs[:9])
    d_fq_ref, d_fk_ref, d_v_ref = refs[9:]
    g_den = g_den[:, None]
    mask = _causal_mask(q.shape[0])
    scores = jnp.where(mask, _dot(q, k.T), 0.0)
    # d (num_i, den_i) / d weight_ij = (g_i . v_j + g_den_i): the weights' own gradient.
    d_scores = jnp.where(mask, _dot(g, v.T) + g_den, 0.0)
    d_q = _dot(d_scores, k) + _dot(g, state.T) + g_den * z[None, :]
    d_k = _dot(d_scores.T, q) + _dot(v, later.T) + later_den[None, :]
    d_v = _dot(scores.T, g) + _dot(k, later)
    d_fq_ref[...] = d_q.astype(d_fq_ref.dtype)
    d_fk_ref[...] = d_k.astype(d_fk_ref.dtype)
    d_v_ref[...] = d_v.astype(d_v_ref.dtype)


def _call(kernel, rows, per_chunk, outputs, chunk: int, name: str):
    """``rows``: [B, T, H(, D)] arrays split into chunks; ``per_chunk``: [B, H, n(, D(, E))]."""
    b, t, h = rows[0].shape[:3]

    def row_spec(a):
        tail = tuple(a.shape[3:])
        block = (None, chunk, None, *tail)
        return pl.BlockSpec(block, lambda b, h, c: (b, c, h, *(0,) * len(tail)))

    def chunk_spec(a):
        tail = tuple(a.shape[3:])
        return pl.BlockSpec((None, None, None, *tail), lambda b, h, c: (b, h, c, *(0,) * len(tail)))

    return pl.pallas_call(
        kernel,
        grid=(b, h, t // chunk),
        in_specs=[row_spec(a) for a in rows] + [chunk_spec(a) for a in per_chunk],
        out_specs=[row_spec(a) for a in outputs],
        out_shape=outputs,
        interpret=not _on_gpu(),
        # Triton, named: without compiler params jax 0.10 lowers to Mosaic GPU (the default of
        # jax_pallas_use_mosaic_gpu), which cannot lower this kernel (no layout for the iota
        # mask; the first version's [T, D] blocks also overflowed shared memory).
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        name=name,
    )(*rows, *per_chunk)


def _chunk_products(a, b, chunk: int):
    """sum over each chunk's rows of a_i b_i^T: [B, T, H, D], [B, T, H, E] -> [B, H, n, D, E]."""
    batch, t, h, d = a.shape
    a = a.reshape(batch, t // chunk, chunk, h, d)
    b = b.reshape(batch, t // chunk, chunk, h, b.shape[-1])
    return jnp.einsum("bncha,bnche->bhnae", a, b, preferred_element_type=_F32)


def _chunk_row_sums(a, weights, chunk: int):
    """sum over each chunk's rows of weights_i a_i: [B, T, H, D], [B, T, H] -> [B, H, n, D]."""
    batch, t, h, d = a.shape
    a = a.reshape(batch, t // chunk, chunk, h, d)
    w = weights.reshape(batch, t // chunk, chunk, h)
    return jnp.einsum("bnchd,bnch->bhnd", a, w, preferred_element_type=_F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _product(fq, fk, v, chunk):
    return _product_fwd(fq, fk, v, chunk)[0]


def _product_fwd(fq, fk, v, chunk):
    b, t, h, _ = fq.shape
    state = sum_before(_chunk_products(fk, v, chunk))  # [B, H, n, D, E]
    z = sum_before(_chunk_row_sums(fk, jnp.ones((b, t, h), fk.dtype), chunk))  # [B, H, n, D]
    outputs = (
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct((b, t, h), v.dtype),
    )
    num, den = _call(
        _forward_kernel, (fq, fk, v), (state, z), outputs, chunk, "linear_attention_fwd"
    )
    return (num, den), (fq, fk, v, state, z)


def _product_bwd(chunk, residuals, grads):
    fq, fk, v, state, z = residuals
    g_num, g_den = grads
    later = sum_after(_chunk_products(fq, g_num, chunk))  # [B, H, n, D, E]
    later_den = sum_after(_chunk_row_sums(fq, g_den, chunk))  # [B, H, n, D]
    outputs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (fq, fk, v))
    return _call(
        _backward_kernel,
        (fq, fk, v, g_num, g_den),
        (state, z, later, later_den),
        outputs,
        chunk,
        "linear_attention_bwd",
    )


_product.defvjp(_product_fwd, _product_bwd)


def causal_linear_product_pallas(
    fq: jax.Array, fk: jax.Array, v: jax.Array, chunk_size: int = 64
) -> tuple[jax.Array, jax.Array]:
    """(sum_{j<=i} (fq_i . fk_j) v_j, sum_{j<=i} fq_i . fk_j) for features in
    [batch, T, heads, D] and values [batch, T, heads, E], with the Pallas kernel.

    T is padded with zeros to whole chunks (after the last step: no real query sees them). On a
    GPU, Triton's block shapes are powers of two of at least 16, so the chunk, D and E are
    padded up to those too (zero features and values add nothing)."""
    t, d, e = fq.shape[1], fq.shape[-1], v.shape[-1]
    chunk = max(1, min(chunk_size, t))
    if _on_gpu():
        chunk = max(16, pl.next_power_of_2(chunk))
        fq, fk = (pad_axis(a, 3, max(16, pl.next_power_of_2(d))) for a in (fq, fk))
        v = pad_axis(v, 3, max(16, pl.next_power_of_2(e)))
    padded = -(-t // chunk) * chunk
    fq, fk, v = (pad_axis(a, 1, padded) for a in (fq, fk, v))
    num, den = _product(fq, fk, v, chunk)
    return num[:, :t, :, :e], den[:, :t, :, None]
