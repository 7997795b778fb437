"""torch's GRU recurrence by the fused CPU kernel (``native/gru.cc``), forward and backward: all
T steps of one layer's directions in one call, each (direction, block of batch rows) on one
thread, the gates fused into the step's product with the packed W_hh."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hw2jax.kernels.build import TARGETS, build_error, register_targets


def gru_unavailable_reason(hidden: int, dtype: jnp.dtype) -> str | None:
    """None if :func:`gru_recurrence_cpu` can run for this hidden size and dtype here, else why
    not (building the kernels on first call)."""
    if jax.default_backend() != "cpu":
        return f"the fused GRU kernel is for CPU; jax's backend here is {jax.default_backend()!r}"
    if jnp.dtype(dtype) != jnp.float32:
        return f"the fused GRU kernel computes in float32, not {jnp.dtype(dtype).name}"
    if hidden % 16:
        return f"the fused GRU kernel wants a hidden size that is a multiple of 16, not {hidden}"
    return build_error()


def _call(target: str, shapes: list[tuple[int, ...]], *args):
    register_targets()
    results = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.ffi.ffi_call(TARGETS[target][1], results, vmap_method="sequential")(*args)


@jax.custom_vjp
def gru_recurrence_cpu(x_proj, w_hh, b_hh, valid):
    """The recurrence of :func:`hw2jax.models.gru` for all directions of one layer: x_proj
    [T, D, B, 3H] (W_ih x + b_ih, reversed within each length for the reverse direction),
    w_hh [D, 3H, H], b_hh [D, 3H], valid [B, T] bool. Returns outputs [T, D, B, H] (0 past a
    sequence's end) and the last states [D, B, H]. float32, H a multiple of 16
    (:func:`gru_unavailable_reason`)."""
    t, d, b, three_h = x_proj.shape
    h = three_h // 3
    return tuple(_call("gru_forward", [(t, d, b, h), (d, b, h)], x_proj, w_hh, b_hh, valid))


def _forward(x_proj, w_hh, b_hh, valid):
    t, d, b, three_h = x_proj.shape
    h = three_h // 3
    out, last, *saved = _call(
        "gru_forward_save",
        [(t, d, b, h), (d, b, h)] + [(t, d, b, h)] * 5,
        x_proj,
        w_hh,
        b_hh,
        valid,
    )
    return (out, last), (w_hh, valid, saved)


def _backward(residuals, cotangents):
    w_hh, valid, saved = residuals
    g_out, g_h = cotangents
    t, d, b, h = g_out.shape
    d_xp, d_w, d_b = _call(
        "gru_backward",
        [(t, d, b, 3 * h), (d, 3 * h, h), (d, 3 * h)],
        w_hh,
        valid,
        *saved,
        g_out,
        g_h,
    )
    return d_xp, d_w, d_b, None


gru_recurrence_cpu.defvjp(_forward, _backward)
