"""Row-wise fused CPU kernels: layer norm over the last axis, forward and backward (one pass over
each row each way, where XLA makes several and, for a weight gradient that wants the output
transposed, evaluates it a second time), the forward also of a post-norm residual sum, and
GELU(x + bias) on XLA's threads (XLA runs that
loop on one). benchmarks/NOTES.md has the timings. Whether they are used is decided in
:mod:`hw2jax.attention.dispatch`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax.errors import InputError
from hw2jax.kernels.build import TARGETS, KernelUnavailable, cpu_attention_unavailable_reason
from hw2jax.kernels.ffi import differentiated_by, on_mesh


def _f32(*shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _forward_call(x, gamma, beta, eps: float, out: str, plus=()):
    """The forward's (y, mean, 1 / std); with ``plus`` = (h, h_bias), of x + (h + h_bias)
    (float32 out)."""
    rows, c = x.shape
    if plus:
        target = "add_layer_norm_forward"
    else:
        target = "layer_norm_forward" if out == "float32" else "layer_norm_forward_bf16"
    call = jax.ffi.ffi_call(
        TARGETS[target][1],
        (jax.ShapeDtypeStruct((rows, c), jnp.dtype(out)), _f32(rows), _f32(rows)),
        vmap_method="sequential",
    )
    return call(x, *plus, gamma, beta, eps=np.float32(eps))


def _backward_call(x, gamma, mean, rstd, dy):
    rows, c = x.shape
    call = jax.ffi.ffi_call(
        TARGETS["layer_norm_backward"][1],
        (_f32(rows, c), _f32(c), _f32(c)),
        vmap_method="sequential",
    )
    return call(x, gamma, mean, rstd, dy)


@functools.cache
def _row_split(local, rule: str):
    """``local`` on a mesh whose devices split the rows: ``rule`` lays operands and results out
    as "r c" a matrix of rows, "r" one value per row, "c" a whole vector; a "c" result is a sum
    over the rows (the scale and bias gradients), added over the devices."""
    return on_mesh(local, rule, split="r")


@functools.cache
def _partitioned_forward(eps: float, out: str):
    """The forward on a mesh whose devices split the rows: each normalises its own."""

    def local(x, gamma, beta):
        return _forward_call(x, gamma, beta, eps, out)

    return _row_split(local, "r c, c, c -> r c, r, r")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, gamma, beta, eps, out):
    return _partitioned_forward(eps, out)(x, gamma, beta)[0]


def _layer_norm_fwd(x, gamma, beta, eps, out):
    y, mean, rstd = _partitioned_forward(eps, out)(x, gamma, beta)
    return y, (x, gamma, mean, rstd)


def _layer_norm_bwd(eps, out, residuals, dy):
    backward = _row_split(_backward_call, "r c, c, r, r, r c -> r c, c, c")
    return backward(*residuals, dy.astype(jnp.float32))


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm_unsupported(shape, dtype) -> str | None:
    """Why :func:`cpu_layer_norm` (or :func:`cpu_bias_gelu`) does not take x of this shape
    and dtype, or None."""
    if jnp.dtype(dtype) != jnp.float32:
        return f"it takes float32; got {jnp.dtype(dtype)}"
    if len(shape) < 1 or shape[-1] % 16 or shape[-1] == 0:
        return f"the last axis must be a positive multiple of 16; got shape {tuple(shape)}"
    return None


def row_kernel_unavailable_reason(shape, dtype) -> str | None:
    """Why a row kernel cannot take x of this shape and dtype here: the input
    (:func:`layer_norm_unsupported`), else the kernels' build; None if it can."""
    problem = layer_norm_unsupported(shape, dtype)
    return problem or cpu_attention_unavailable_reason(16, jnp.float32)


def cpu_layer_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, out_dtype=jnp.float32
) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over x's last axis (the variance about
    the mean, as torch.nn.LayerNorm), forward and backward by fused CPU kernels, computed in
    float32 and returned as ``out_dtype`` (float32, or bf16 rounded as it is stored; its
    gradient arrives upcast). x: float32 [..., C] with C a multiple of 16; scale, bias: [C].
    Raises :class:`InputError` for other inputs and :class:`KernelUnavailable` where the
    kernel cannot run here."""
    out = jnp.dtype(out_dtype).name
    if out not in ("float32", "bfloat16"):
        raise InputError(f"cpu_layer_norm returns float32 or bfloat16, not {out}.")
    if (problem := layer_norm_unsupported(x.shape, x.dtype)) is not None:
        raise InputError(f"cpu_layer_norm: {problem}. flax.linen.LayerNorm takes any input.")
    if scale.shape != x.shape[-1:] or bias.shape != x.shape[-1:]:
        raise InputError(
            f"cpu_layer_norm wants scale and bias of shape {x.shape[-1:]}; got {scale.shape} "
            f"and {bias.shape}."
        )
    if (reason := cpu_attention_unavailable_reason(16, jnp.float32)) is not None:
        raise KernelUnavailable(reason)
    flat = x.reshape(-1, x.shape[-1])
    y = _layer_norm(flat, scale.astype(jnp.float32), bias.astype(jnp.float32), float(eps), out)
    return y.reshape(x.shape)


@functools.cache
def _add_layer_norm(eps: float):
    """LN(x + (h + h_bias)) over x's last axis, in one kernel pass where nothing
    differentiates it; differentiated, the sum in XLA (over x's own axes, so h_bias's
    gradient sums as it does for x + h) and the layer norm's kernels, whose backward wants the
    sum kept."""

    def local(x, h, h_bias, gamma, beta):
        return _forward_call(x, gamma, beta, eps, "float32", plus=(h, h_bias))[0]

    rows = _row_split(local, "r c, r c, c, c, c -> r c")

    def forward(x, h, h_bias, gamma, beta):
        flat = (t.reshape(-1, x.shape[-1]) for t in (x, h))
        return rows(*flat, h_bias, gamma, beta).reshape(x.shape)

    def differentiated(x, h, h_bias, gamma, beta):
        total = (x + (h + h_bias)).reshape(-1, x.shape[-1])
        return _layer_norm(total, gamma, beta, eps, "float32").reshape(x.shape)

    return differentiated_by(forward, differentiated)


def cpu_add_layer_norm(
    x: jax.Array, h: jax.Array, h_bias: jax.Array, scale: jax.Array, bias: jax.Array, eps: float
) -> jax.Array:
    """:func:`cpu_layer_norm` of ``x + (h + h_bias)``, all float32: a post-norm residual, a
    layer's product h, its bias [C] and the stream x [..., C] added in the layer norm's own
    pass over the rows, in the order XLA adds them (the same floats). Differentiated, the sum
    runs in XLA. Raises :class:`InputError` for other inputs and :class:`KernelUnavailable`
    where the kernel cannot run here."""
    if (problem := layer_norm_unsupported(x.shape, x.dtype)) is not None:
        raise InputError(f"cpu_add_layer_norm: {problem}. flax.linen.LayerNorm takes any input.")
    c = x.shape[-1:]
    if h.shape != x.shape or h.dtype != jnp.float32:
        raise InputError(
            f"cpu_add_layer_norm wants h of x's shape {x.shape}, float32; got {h.shape} {h.dtype}."
        )
    if any(v.shape != c for v in (h_bias, scale, bias)):
        raise InputError(
            f"cpu_add_layer_norm wants h_bias, scale and bias of shape {c}; got "
            f"{h_bias.shape}, {scale.shape} and {bias.shape}."
        )
    if (reason := cpu_attention_unavailable_reason(16, jnp.float32)) is not None:
        raise KernelUnavailable(reason)
    vectors = (v.astype(jnp.float32) for v in (h_bias, scale, bias))
    return _add_layer_norm(float(eps))(x, h, *vectors)


def _bias_gelu_call(x, bias):
    call = jax.ffi.ffi_call(TARGETS["bias_gelu"][1], _f32(*x.shape), vmap_method="sequential")
    return call(x, bias)


def _bias_gelu_unfused(x, bias):
    return jax.nn.gelu(x + bias, approximate=False)


# Differentiated, XLA's GELU: its derivative wants x + bias, which the kernel never keeps.
_bias_gelu = differentiated_by(
    lambda x, bias: _row_split(_bias_gelu_call, "r c, c -> r c")(x, bias), _bias_gelu_unfused
)


def cpu_bias_gelu(x: jax.Array, bias: jax.Array) -> jax.Array:
    """``gelu(x + bias)``, the exact (erf) GELU, over float32 x [..., N] (N a multiple of 16)
    and bias [N], by a CPU kernel on XLA's threads; differentiated, it runs as XLA's
    ``jax.nn.gelu(x + bias, approximate=False)``. Raises :class:`InputError` for other inputs
    and :class:`KernelUnavailable` where the kernel cannot run here."""
    if (problem := layer_norm_unsupported(x.shape, x.dtype)) is not None:
        raise InputError(f"cpu_bias_gelu: {problem}. jax.nn.gelu takes any input.")
    if bias.shape != x.shape[-1:]:
        raise InputError(f"cpu_bias_gelu wants a bias of shape {x.shape[-1:]}; got {bias.shape}.")
    if (reason := cpu_attention_unavailable_reason(16, jnp.float32)) is not None:
        raise KernelUnavailable(reason)
    flat = x.reshape(-1, x.shape[-1])
    return _bias_gelu(flat, bias.astype(jnp.float32)).reshape(x.shape)
