"""Softmax (scaled dot-product) attention: one entry point for our forms and the fused kernels."""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from hw2jax import kernels
from hw2jax.attention import dispatch
from hw2jax.attention.blockwise import blockwise_softmax_attention
from hw2jax.attention.helpers import check_qkv, matmul_f32, pad_axis
from hw2jax.errors import InputError

IMPLEMENTATIONS = dispatch.SOFTMAX


def softmax_attention(
    q: jax.typing.ArrayLike,
    k: jax.typing.ArrayLike,
    v: jax.typing.ArrayLike,
    *,
    causal: bool = False,
    implementation: Literal[
        "auto", "jax", "xla", "cudnn", "pallas", "blockwise", "naive", "fused_cpu"
    ] = "auto",
) -> jax.Array:
    """Scaled dot-product attention, softmax(q k^T / sqrt(d)) v, one entry point for every form:

    - ``"naive"``: ours, the T x T scores in memory (O(T^2));
    - ``"blockwise"``: ours, :func:`blockwise_softmax_attention` (online softmax, O(T) memory);
    - ``"jax"``: ``jax.nn.dot_product_attention`` with no implementation named (JAX's own
      choice: cuDNN where it applies on a GPU, else XLA);
    - ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``;
    - ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused kernel
      (NVIDIA GPUs, float16 or bfloat16, head dim a multiple of 8 up to 128);
    - ``"pallas"``: JAX's Pallas flash-attention kernel (``jax.experimental.pallas.ops.gpu``),
      forward and backward; compiled with Triton on a GPU, run in interpret mode elsewhere
      (slow: for tests and checks);
    - ``"fused_cpu"``: our fused CPU kernels (:mod:`hw2jax.kernels`; float32, q, k and v of one
      shape, head dim a multiple of 16 up to 128), causal or not. Without differentiation,
      non-causal below 2^26 scores per (batch, head): the row kernel
      (:func:`hw2jax.kernels.cpu_attention`, BERT's); otherwise the flash kernel
      (:func:`hw2jax.kernels.cpu_flash_attention`), whose forward keeps each row's log-sum-exp
      and whose backward recomputes the probabilities block by block (O(T) memory). jax runs a
      custom_vjp's own function when nothing is differentiated and its forward rule when
      something is;
    - ``"auto"``: the rule of :mod:`hw2jax.attention.dispatch` (its docstring states it).

    All return the same function to rounding (tested against a float64 formula, values and
    gradients; cudnn on a GPU only).
    """
    q, k, v = check_qkv(q, k, v, causal)
    dispatch.check(implementation, IMPLEMENTATIONS, "softmax_attention")
    if implementation == "auto":
        scores = q.shape[1] * k.shape[1]
        reason = functools.partial(_fused_cpu_unavailable, q, k, v)
        implementation = dispatch.softmax(
            scores, causal, reason, measure=timed_paths(q, k, v, causal)
        )
    if isinstance(implementation, tuple):  # auto's choice of fused forward and gradient
        return _fused(q, k, v, causal, *implementation)
    if implementation == "fused_cpu":
        dispatch.refuse_if_cannot_run(implementation, _fused_cpu_unavailable(q, k, v), "'auto'")
        row = not causal and q.shape[1] * k.shape[1] < dispatch.BLOCKWISE_FROM
        return _fused(q, k, v, causal, "row" if row else "flash", "flash")
    return _dispatch(q, k, v, causal, implementation)


def _dispatch(q, k, v, causal: bool, implementation: str) -> jax.Array:
    if implementation == "blockwise":
        return blockwise_softmax_attention(q, k, v, causal=causal)
    if implementation == "jax":
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    if implementation == "cudnn":
        dispatch.refuse_if_cannot_run(implementation, _cudnn_unavailable(q, k, v), "'auto'")
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    if implementation == "pallas":
        return _pallas_flash(q, k, v, causal)
    return _naive(q, k, v, causal)


def timed_paths(q, k, v, causal: bool) -> dispatch.Measure:
    """What auto times for these inputs: the function of (q, k, v) that each of the rule's
    paths computes ("row" and "flash": the fused kernels)."""

    def run(path: str):
        if path in ("row", "flash"):
            return lambda q, k, v: _fused(q, k, v, causal, path, "flash")
        return lambda q, k, v: _dispatch(q, k, v, causal, path)

    return dispatch.Measure((q, k, v), run)


def _fused_cpu_unavailable(q, k, v) -> str | None:
    if not q.shape == k.shape == v.shape:
        return (
            f"the fused CPU kernel wants q, k, v of one shape; got {q.shape}, {k.shape}, {v.shape}"
        )
    return kernels.cpu_attention_unavailable_reason(q.shape[-1], q.dtype)


def _fused(q, k, v, causal: bool, forward: str, gradient: str):
    """``forward`` ("row": the row kernel, non-causal; "flash": the flash kernel; or
    "blockwise") when nothing is differentiated. Under differentiation ``gradient`` runs
    instead, forward and backward: the flash kernels for ``"flash"``, else that
    implementation."""
    return kernels.differentiated_by(
        functools.partial(_form, causal=causal, path=forward),
        functools.partial(_form, causal=causal, path=gradient),
    )(q, k, v)


def _form(q, k, v, causal: bool, path: str):
    if path == "row":
        return kernels.cpu_attention(q, k, v)
    if path == "flash":
        return kernels.cpu_flash_attention(q, k, v, causal=causal)
    return _dispatch(q, k, v, causal, path)


def _on_nvidia() -> bool:
    return "nvidia" in jax.devices()[0].device_kind.lower()


def _cudnn_unavailable(q, k, v) -> str | None:
    if jax.default_backend() != "gpu" or not _on_nvidia():
        return f"cuDNN needs an NVIDIA GPU; jax's backend here is {jax.default_backend()!r}"
    if q.dtype not in (jnp.float16, jnp.bfloat16):
        return f"cuDNN's fused attention takes float16 or bfloat16, not {q.dtype}"
    d = q.shape[-1]
    if d % 8 or d > 128 or v.shape[-1] != d:
        return f"head dim {d} (values {v.shape[-1]}) must be equal, a multiple of 8 and <= 128"
    return None


def _pallas_flash(q, k, v, causal: bool) -> jax.Array:
    """JAX's Pallas flash attention; sequences padded to whole blocks, the padded keys masked
    through its segment ids."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    if v.shape[-1] != q.shape[-1] or q.shape[1] != k.shape[1]:
        raise InputError(
            "implementation='pallas' needs v's head dim equal to q's and as many keys as "
            f"queries; got q {q.shape}, k {k.shape}, v {v.shape}. Use 'blockwise'."
        )
    t = q.shape[1]
    block = min(64, max(16, 1 << (t - 1).bit_length()))
    padded = -(-t // block) * block
    qp, kp, vp = (pad_axis(a, 1, padded) for a in (q, k, v))
    segments = jnp.broadcast_to((jnp.arange(padded) < t).astype(jnp.int32), (q.shape[0], padded))
    sizes = pallas_attention.BlockSizes(
        block_q=block,
        block_k=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    out = pallas_attention.mha(
        qp,
        kp,
        vp,
        segments,
        sm_scale=1.0 / math.sqrt(q.shape[-1]),
        causal=causal,
        block_sizes=sizes,
        interpret=jax.default_backend() != "gpu",
    )
    return out[:, :t].astype(v.dtype)


def _naive(q, k, v, causal: bool) -> jax.Array:
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
