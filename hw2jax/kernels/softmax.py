"""Softmax attention by the fused CPU kernels: the row kernel (a key bias, forward only; BERT's)
and the flash kernel (causal or not, a key bias, dropout; forward and backward: FlashAttention-2's
algorithm, the backward recomputing probabilities from each row's log-sum-exp)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax.errors import InputError
from hw2jax.kernels import dropout
from hw2jax.kernels.build import (
    SUPPORTED_HEAD_DIMS,
    TARGETS,
    KernelUnavailable,
    cpu_attention_unavailable_reason,
)
from hw2jax.kernels.ffi import ffi_kernel
from hw2jax.kernels.matmul import amx_matmul_unavailable_reason


def _check_shapes(name: str, q, k, v) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise InputError(
            f"{name} wants q, k and v of one shape [batch, T, heads, head_dim]; got "
            f"{q.shape}, {k.shape}, {v.shape}. Use hw2jax.attention.softmax_attention for others."
        )


def _check_softmax_inputs(name: str, q, k, v) -> None:
    """Shapes first (ValueError), then whether the kernel can run here (KernelUnavailable)."""
    _check_shapes(name, q, k, v)
    reason = cpu_attention_unavailable_reason(q.shape[-1], q.dtype)
    if reason is not None:
        raise KernelUnavailable(reason)


def cpu_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_bias: jax.Array | None = None,
    *,
    scale: float | None = None,
    qkv_biases: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """softmax(scale q.k^T + key_bias) v with the fused CPU row kernel, forward only (it keeps
    nothing for a backward pass; differentiated, :func:`hw2jax.attention.key_bias_attention`
    runs :func:`cpu_flash_attention` instead).

    q, k, v: float32 ``[B, T, heads, D]`` (the layout the projections produce);
    key_bias: ``[B, T]``, added to the scores of each key (0 keeps a key, a large negative
    number such as ``finfo(float32).min`` masks it); scale defaults to 1/sqrt(D).
    ``qkv_biases``: float32 ``[heads, D]`` each, added to q, k and v as the kernel reads them
    (the projections' biases, as a dense layer adds them: the same floats, without a pass of
    their own). Raises :class:`KernelUnavailable` (or ValueError for bad shapes) with what to
    do instead.
    """
    _check_softmax_inputs("cpu_attention", q, k, v)
    if qkv_biases is None:
        return _row_kernel("attention", q, k, v, key_bias, scale)
    if len(qkv_biases) != 3 or any(
        jnp.shape(b) != q.shape[-2:] or jnp.asarray(b).dtype != jnp.float32 for b in qkv_biases
    ):
        raise InputError(
            f"cpu_attention's qkv_biases are three float32 [heads, D] = {q.shape[-2:]} arrays; "
            f"got {[(jnp.shape(b), jnp.asarray(b).dtype.name) for b in qkv_biases]}."
        )
    return _row_kernel("attention_with_biases", q, k, v, key_bias, scale, tuple(qkv_biases))


def amx_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_bias: jax.Array | None = None,
    *,
    scale: float | None = None,
    out_dtype=jnp.float32,
) -> jax.Array:
    """:func:`cpu_attention` for bfloat16 q, k, v on AMX tiles (CPUs with AMX-BF16), forward
    only: both products on the tiles with float32 accumulation, the softmax in float32 and the
    probabilities rounded to bf16 before they multiply v, as torch's bf16 attention does. The
    output is ``[B, T, heads, D]``, float32 or, with ``out_dtype=jnp.bfloat16``, rounded to
    bf16 as it is stored (the floats of the float32 output's ``.astype``, without its pass).
    Raises :class:`KernelUnavailable` where :func:`amx_matmul_unavailable_reason` gives a
    reason."""
    _check_shapes("amx_attention", q, k, v)
    if not q.dtype == k.dtype == v.dtype == jnp.bfloat16:
        raise InputError(
            f"amx_attention takes bfloat16 q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}. Use "
            "cpu_attention for float32."
        )
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise InputError(
            f"amx_attention's head dim must be one of {SUPPORTED_HEAD_DIMS}; got {q.shape[-1]}."
        )
    if jnp.dtype(out_dtype) not in (jnp.float32, jnp.bfloat16):
        raise InputError(f"amx_attention returns float32 or bfloat16, not {out_dtype}.")
    if (reason := amx_matmul_unavailable_reason()) is not None:
        raise KernelUnavailable(f"the AMX attention cannot run here: {reason}. Use cpu_attention.")
    bf16 = jnp.dtype(out_dtype) == jnp.bfloat16
    target = "amx_attention_bf16" if bf16 else "amx_attention"
    return _row_kernel(target, q, k, v, key_bias, scale, out_dtype=jnp.dtype(out_dtype).name)


def _checked_key_bias(key_bias, shape: tuple) -> jax.Array:
    """key_bias as float32 [batch, T], or an InputError naming what to pass."""
    if jnp.asarray(key_bias).dtype == jnp.bool_:
        raise InputError(
            "key_bias is added to the scores, not a boolean mask: pass "
            "jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)."
        )
    if jnp.shape(key_bias) != tuple(shape):
        raise InputError(
            f"key_bias must be [batch, T] = {tuple(shape)}, got {jnp.shape(key_bias)}."
        )
    return jnp.asarray(key_bias).astype(jnp.float32)


def _row_kernel(
    target: str, q, k, v, key_bias, scale: float | None, biases=(), out_dtype="float32"
) -> jax.Array:
    """The row kernel ``target`` with the key bias checked: [B, T, heads, D] as ``out_dtype``;
    ``biases``, [heads, D] each, follow the key bias."""
    if key_bias is None:
        key_bias = jnp.zeros(q.shape[:2], jnp.float32)
    key_bias = _checked_key_bias(key_bias, q.shape[:2])
    scale = 1.0 / float(np.sqrt(q.shape[-1])) if scale is None else float(scale)
    kernel = ffi_kernel(
        TARGETS[target][1],
        ("bthd",) * 3 + ("bt",) + ("hd",) * len(biases),
        ("bthd",),
        (("scale", np.float32(scale)),),
        out_dtype,
    )
    return kernel(q, k, v, key_bias, *biases)[0]


def _flash_attrs(scale: float, causal: bool, dropout: float) -> tuple:
    return (
        ("scale", np.float32(scale)),
        ("causal", np.int32(causal)),
        ("dropout", np.float32(dropout)),
    )


def _flash_forward_call(q, k, v, key_bias, seeds, scale: float, causal: bool, dropout: float):
    kernel = ffi_kernel(
        TARGETS["flash_forward"][1],
        ("bthd",) * 3 + ("bt", "bh"),
        ("bthd", "bht"),
        _flash_attrs(scale, causal, dropout),
    )
    return kernel(q, k, v, key_bias, seeds)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, key_bias, seeds, scale: float, causal: bool, dropout: float):
    return _flash_forward_call(q, k, v, key_bias, seeds, scale, causal, dropout)[0]


def _flash_fwd(q, k, v, key_bias, seeds, scale, causal, dropout):
    out, lse = _flash_forward_call(q, k, v, key_bias, seeds, scale, causal, dropout)
    return out, (q, k, v, key_bias, seeds, out, lse)


def _flash_bwd(scale, causal, dropout, residuals, grad):
    kernel = ffi_kernel(
        TARGETS["flash_backward"][1],
        ("bthd",) * 3 + ("bt", "bh", "bthd", "bht", "bthd"),
        ("bthd",) * 3 + ("bht",),
        _flash_attrs(scale, causal, dropout),
    )
    dq, dk, dv, dbias = kernel(*residuals, grad)
    seeds = residuals[4]
    return dq, dk, dv, dbias.sum(axis=1), np.zeros(seeds.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)


def cpu_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_bias: jax.Array | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_seeds: jax.Array | None = None,
) -> jax.Array:
    """softmax(scale q.k^T + key_bias) v, optionally causal, with optional dropout on the
    probabilities, forward and backward by the fused CPU kernels.

    The forward pass keeps each row's log-sum-exp; the backward pass recomputes the probabilities
    block by block from it (FlashAttention-2), so neither stores the [T, T] scores. q, k, v:
    float32 ``[B, T, heads, D]`` of one shape; key_bias ``[B, T]`` added to each key's scores
    (differentiable; None: none); scale defaults to 1/sqrt(D). Dropout zeroes probability
    (i, j) of sequence b, head h where :func:`hw2jax.kernels.dropout.keep_mask`'s hash of
    ``dropout_seeds[b, h]`` (uint32 ``[B, heads]``) says so, and scales the rest by
    1 / (1 - dropout_rate); the backward pass regenerates the same mask. Raises
    :class:`KernelUnavailable` (or ValueError for bad shapes) with what to do instead.
    """
    _check_softmax_inputs("cpu_flash_attention", q, k, v)
    b, t, heads = q.shape[:3]
    if key_bias is None:
        key_bias = jnp.zeros((b, t), jnp.float32)
    key_bias = _checked_key_bias(key_bias, (b, t))
    dropout.check(dropout_rate, dropout_seeds, (b, heads), (t, t))
    if dropout_seeds is None:
        dropout_seeds = jnp.zeros((b, heads), jnp.uint32)
    scale = 1.0 / float(np.sqrt(q.shape[-1])) if scale is None else float(scale)
    # A finite floor: a block of keys all at -inf would leave its running maximum undefined.
    # (where, not maximum: a bias at the floor keeps its whole gradient.)
    lowest = jnp.finfo(jnp.float32).min
    key_bias = jnp.where(key_bias < lowest, lowest, key_bias)
    return _flash(q, k, v, key_bias, dropout_seeds, scale, bool(causal), float(dropout_rate))


def _few_keys_forward_call(q, kv):
    kernel = ffi_kernel(TARGETS["few_keys_forward"][1], ("bqd", "bkd"), ("bqd", "bqk"))
    return kernel(q, kv)


@jax.custom_vjp
def _few_keys(q, kv):
    return _few_keys_forward_call(q, kv)[0]


def _few_keys_fwd(q, kv):
    out, probs = _few_keys_forward_call(q, kv)
    return out, (q, kv, probs)


def _few_keys_bwd(residuals, grad):
    kernel = ffi_kernel(
        TARGETS["few_keys_backward"][1], ("bqd", "bkd", "bqk", "bqd"), ("bqd", "bkd")
    )
    return kernel(*residuals, grad)


_few_keys.defvjp(_few_keys_fwd, _few_keys_bwd)


FEW_KEYS_DIMS = (16, 32, 64, 128)  # the feature sizes the few-keys kernel is compiled for
FEW_KEYS_MAX = 64  # its most keys


def few_keys_unsupported(q_shape, kv_shape, dtype) -> str | None:
    """Why :func:`cpu_few_keys_attention` does not take these shapes and dtype, or None."""
    if len(q_shape) != 3 or len(kv_shape) != 3 or q_shape[::2] != kv_shape[::2]:
        return f"it wants q [B, M, D] and kv [B, N, D]; got {tuple(q_shape)} and {tuple(kv_shape)}"
    if jnp.dtype(dtype) != jnp.float32:
        return f"it computes in float32; got {jnp.dtype(dtype)}"
    if q_shape[-1] not in FEW_KEYS_DIMS:
        return f"D must be one of {FEW_KEYS_DIMS}; got {q_shape[-1]}"
    if not 1 <= kv_shape[1] <= FEW_KEYS_MAX:
        return f"kv must have 1 to {FEW_KEYS_MAX} rows; got {kv_shape[1]}"
    return None


def cpu_few_keys_attention(q: jax.Array, kv: jax.Array) -> jax.Array:
    """softmax(q kv^T) kv, forward and backward by fused CPU kernels, for many query rows
    against a few keys that are also the values (the ViT's regrouped heads): float32 q
    [B, M, D] and kv [B, N, D] with D in :data:`FEW_KEYS_DIMS` and N <= 64; no scale (fold it
    into q). The forward keeps the [B, M, N] probabilities for the backward. Raises
    :class:`InputError` for other shapes and :class:`KernelUnavailable` where the kernel
    cannot run here."""
    if (problem := few_keys_unsupported(q.shape, kv.shape, q.dtype)) is not None:
        raise InputError(
            f"cpu_few_keys_attention: {problem}. hw2jax.attention.matmul_f32 and "
            "jax.nn.softmax compute the same for any shape."
        )
    if kv.dtype != q.dtype:
        raise InputError(f"cpu_few_keys_attention: q is {q.dtype} but kv {kv.dtype}; cast both.")
    if (reason := cpu_attention_unavailable_reason(q.shape[-1], q.dtype)) is not None:
        raise KernelUnavailable(reason)
    return _few_keys(q, kv)
