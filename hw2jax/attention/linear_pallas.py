"""Causal linear attention's chunk algorithm as a Pallas kernel, forward and backward.

One program per (batch, head) walks the chunks in order: exact attention inside a chunk (a
masked [C, C] product) plus the running state S = sum_j fk_j v_j^T and z = sum_j fk_j carried
from the chunks before, so no [T, T] matrix and no stack of T states is ever stored. The
backward pass is the same walk twice: forward for d fq (with S, z), in reverse for d fk and d v
(with R = sum_i fq_i g_i^T and r = sum_i fq_i g_den_i over the chunks after).

On a GPU the kernel is compiled with Triton; elsewhere it runs in Pallas's interpret mode
(slow: it exists there so that tests cover the same code).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from hw2jax.attention.helpers import pad_axis

_F32 = jnp.float32


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _causal_mask(chunk: int) -> jax.Array:
    rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    return rows >= cols


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=_F32)


def _forward_kernel(fq_ref, fk_ref, v_ref, num_ref, den_ref, *, chunk: int):
    mask = _causal_mask(chunk)

    def body(c, carry):
        state, z = carry  # [D, E], [1, D]: sums over the chunks before this one
        rows = pl.ds(c * chunk, chunk)
        q, k, v = fq_ref[rows, :].astype(_F32), fk_ref[rows, :].astype(_F32), v_ref[rows, :]
        scores = jnp.where(mask, _dot(q, k.T), 0.0)
        num_ref[rows, :] = (_dot(scores, v.astype(_F32)) + _dot(q, state)).astype(num_ref.dtype)
        den_ref[rows] = (jnp.sum(scores, axis=1) + jnp.sum(q * z, axis=1)).astype(den_ref.dtype)
        return state + _dot(k.T, v.astype(_F32)), z + jnp.sum(k, axis=0, keepdims=True)

    d, e = fq_ref.shape[-1], v_ref.shape[-1]
    init = (jnp.zeros((d, e), _F32), jnp.zeros((1, d), _F32))
    jax.lax.fori_loop(0, fq_ref.shape[0] // chunk, body, init)


def _backward_kernel(
    fq_ref, fk_ref, v_ref, g_num_ref, g_den_ref, d_fq_ref, d_fk_ref, d_v_ref, *, chunk: int
):
    mask = _causal_mask(chunk)
    n = fq_ref.shape[0] // chunk

    def load(c):
        rows = pl.ds(c * chunk, chunk)
        refs = (fq_ref, fk_ref, v_ref, g_num_ref)
        q, k, v, g = (r[rows, :].astype(_F32) for r in refs)
        g_den = g_den_ref[rows].astype(_F32)[:, None]
        # d (num_i, den_i) / d weight_ij = (g_i . v_j + g_den_i): the weights' own gradient.
        d_scores = jnp.where(mask, _dot(g, v.T) + g_den, 0.0)
        return rows, q, k, v, g, g_den, d_scores

    def queries(c, carry):
        state, z = carry
        rows, _, k, v, g, g_den, d_scores = load(c)
        d_q = _dot(d_scores, k) + _dot(g, state.T) + g_den * z
        d_fq_ref[rows, :] = d_q.astype(d_fq_ref.dtype)
        return state + _dot(k.T, v), z + jnp.sum(k, axis=0, keepdims=True)

    def keys(step, carry):
        later, later_den = carry  # [D, E], [1, D]: sums over the chunks after this one
        rows, q, k, v, g, g_den, d_scores = load(n - 1 - step)
        scores = jnp.where(mask, _dot(q, k.T), 0.0)
        d_k = _dot(d_scores.T, q) + _dot(v, later.T) + later_den
        d_v = _dot(scores.T, g) + _dot(k, later)
        d_fk_ref[rows, :] = d_k.astype(d_fk_ref.dtype)
        d_v_ref[rows, :] = d_v.astype(d_v_ref.dtype)
        return later + _dot(q.T, g), later_den + jnp.sum(q * g_den, axis=0, keepdims=True)

    d, e = fq_ref.shape[-1], v_ref.shape[-1]
    zeros = (jnp.zeros((d, e), _F32), jnp.zeros((1, d), _F32))
    jax.lax.fori_loop(0, n, queries, zeros)
    jax.lax.fori_loop(0, n, keys, zeros)


def _call(kernel, inputs, outputs, chunk: int, name: str):
    b, t, h = inputs[0].shape[:3]
    specs = []
    for a in (*inputs, *outputs):
        tail = tuple(a.shape[3:])
        block = (None, t, None, *tail)
        index = (lambda b, h: (b, 0, h, 0)) if tail else (lambda b, h: (b, 0, h))
        specs.append(pl.BlockSpec(block, index))
    return pl.pallas_call(
        functools.partial(kernel, chunk=chunk),
        grid=(b, h),
        in_specs=specs[: len(inputs)],
        out_specs=specs[len(inputs) :],
        out_shape=outputs,
        interpret=not _on_gpu(),
        # Triton, named: without compiler params jax 0.10 lowers to Mosaic GPU (the default of
        # jax_pallas_use_mosaic_gpu), which cannot lower this kernel: it wants layouts for the
        # iota mask and copies each [T, D] block into shared memory (1 MB at T = 1000).
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        name=name,
    )(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _product(fq, fk, v, chunk):
    return _product_fwd(fq, fk, v, chunk)[0]


def _product_fwd(fq, fk, v, chunk):
    b, t, h, _ = fq.shape
    outputs = (
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct((b, t, h), v.dtype),
    )
    num, den = _call(_forward_kernel, (fq, fk, v), outputs, chunk, "linear_attention_fwd")
    return (num, den), (fq, fk, v)


def _product_bwd(chunk, residuals, grads):
    fq, fk, v = residuals
    g_num, g_den = grads
    outputs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in residuals)
    return _call(
        _backward_kernel, (fq, fk, v, g_num, g_den), outputs, chunk, "linear_attention_bwd"
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
