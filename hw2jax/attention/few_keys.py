"""Softmax attention of many query rows over a few keys that are also the values:
``softmax(q kv^T) kv``. The ViT's regrouped heads are this (:class:`hw2jax.models.vit.Attention`:
4 heads x 50 tokens of query rows against the 50 tokens), and at that size a fused kernel
keeps one sequence's [M, N] scores in L1 where XLA makes six passes over them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hw2jax import kernels
from hw2jax.attention import dispatch
from hw2jax.attention.helpers import matmul_f32
from hw2jax.errors import InputError

IMPLEMENTATIONS = dispatch.FEW_KEYS


def few_keys_attention(q: jax.Array, kv: jax.Array, *, implementation: str = "auto") -> jax.Array:
    """softmax(q kv^T) kv per sequence: q [B, M, D], kv [B, N, D] of one dtype (float32, or
    bf16 with float32 scores, softmax and output), no scale (fold it into q). Returns float32
    [B, M, D].

    ``implementation``: ``"fused_cpu"`` (:func:`hw2jax.kernels.cpu_few_keys_attention`: float32,
    D in 16, 32, 64, 128, N <= 64), ``"xla"`` (two batched products and jax.nn.softmax) or
    ``"auto"`` (:func:`hw2jax.attention.dispatch.few_keys`, timed on CPU with gradients)."""
    if q.ndim != 3 or kv.ndim != 3 or q.shape[0] != kv.shape[0] or q.shape[2] != kv.shape[2]:
        raise InputError(
            f"few_keys_attention wants q [B, M, D] and kv [B, N, D] with the same B and D; got "
            f"{q.shape} and {kv.shape}."
        )
    if q.dtype != kv.dtype:
        raise InputError(f"few_keys_attention: q is {q.dtype} but kv {kv.dtype}; cast both.")
    path = resolve(implementation, q.shape, kv.shape, q.dtype, timed_paths(q, kv))
    if path == "fused_cpu":
        return kernels.cpu_few_keys_attention(q, kv)
    return _xla(q, kv)


def resolve(
    implementation: str, q_shape, kv_shape, dtype, measure: dispatch.Measure | None = None
) -> str:
    """ "xla" or "fused_cpu": the dispatch rule's choice for "auto", else the name given,
    checked."""
    reason = functools.partial(fused_unavailable, q_shape, kv_shape, dtype)
    return dispatch.resolve_fused(
        implementation,
        IMPLEMENTATIONS,
        "few_keys_attention",
        reason,
        lambda: dispatch.few_keys(reason, measure=measure),
    )


def fused_unavailable(q_shape, kv_shape, dtype) -> str | None:
    """Why the fused kernel cannot take these inputs here (None: it can)."""
    if (problem := kernels.few_keys_unsupported(q_shape, kv_shape, dtype)) is not None:
        return f"the few-keys kernel: {problem}"
    return kernels.cpu_attention_unavailable_reason(q_shape[-1], jnp.float32)


def timed_paths(q: jax.Array, kv: jax.Array) -> dispatch.Measure:
    """The paths auto times, on inputs shaped as the probe expects ([B, T, heads, D] with one
    head; the third, v, is kv again and unused)."""
    shapes = [jax.ShapeDtypeStruct((*x.shape[:2], 1, x.shape[2]), x.dtype) for x in (q, kv, kv)]

    def run(path: str):
        def attend(q4, kv4, _):
            return few_keys_attention(q4[:, :, 0], kv4[:, :, 0], implementation=path)

        return attend

    return dispatch.Measure(shapes, run)


def _xla(q: jax.Array, kv: jax.Array) -> jax.Array:
    weights = jax.nn.softmax(matmul_f32(q, kv, transpose_b=True), axis=-1)
    return matmul_f32(weights.astype(kv.dtype), kv)
