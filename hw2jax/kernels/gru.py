"""torch's GRU recurrence by the fused CPU kernel (``native/gru.cc``), forward and backward: all
T steps of one layer's directions in one call, each (direction, block of batch rows) on one
thread, the gates fused into the step's product with the packed W_hh. Under ``jax.jit`` on a
mesh that splits the batch, each device runs the kernels on its own rows."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hw2jax.errors import InputError
from hw2jax.kernels.build import TARGETS, build_error, register_targets
from hw2jax.kernels.ffi import on_mesh

# The operands' and results' axes: t steps, d directions, b batch, g = 3H gate rows, h = H.
_X_PROJ, _W_HH, _B_HH, _VALID, _STATES, _LAST = "t d b g", "d g h", "d g", "b t", "t d b h", "d b h"
_FORWARD = ((_X_PROJ, _W_HH, _B_HH, _VALID), (_STATES, _LAST))
_FORWARD_SAVE = (_FORWARD[0], (_STATES, _LAST, *[_STATES] * 5))
_BACKWARD = ((_W_HH, _VALID, *[_STATES] * 5, _STATES, _LAST), (_X_PROJ, _W_HH, _B_HH))


def gru_unavailable_reason(x_proj, w_hh, b_hh, valid) -> str | None:
    """None if :func:`gru_recurrence_cpu` can run on these operands here, else why not
    (building the kernels on first call)."""
    if jax.default_backend() != "cpu":
        return f"the fused GRU kernel is for CPU; jax's backend here is {jax.default_backend()!r}"
    if (problem := gru_unsupported(x_proj, w_hh, b_hh, valid)) is not None:
        return f"the fused GRU kernel: {problem}"
    return build_error()


@functools.cache
def _kernel(target: str, ins: tuple[str, ...], outs: tuple[str, ...]):
    """The FFI target as a function of its operands (axes ``ins``, results ``outs``). On a mesh
    that splits the batch, each device runs its rows, and results without a batch axis (the
    weight gradients, sums over the batch) are summed over the devices that split it. Under
    ``jax.vmap``, one call per vmapped item (the weights may differ from one to the next)."""

    def local(*args):
        register_targets()
        sizes = {
            a: n
            for axes, arg in zip(ins, args, strict=True)
            for a, n in zip(axes.split(), arg.shape, strict=True)
        }
        results = [
            jax.ShapeDtypeStruct([sizes[a] for a in axes.split()], jnp.float32) for axes in outs
        ]
        return tuple(jax.ffi.ffi_call(TARGETS[target][1], results, vmap_method="sequential")(*args))

    sharded = on_mesh(local, ", ".join(ins) + " -> " + ", ".join(outs), split="b")

    @jax.custom_batching.custom_vmap
    def call(*args):
        return sharded(*args)

    @call.def_vmap
    def _one_at_a_time(axis_size, in_batched, *args):
        def one(batched):
            rest = iter(batched)
            return call(*(next(rest) if b else a for a, b in zip(args, in_batched, strict=True)))

        batched = [a for a, b in zip(args, in_batched, strict=True) if b]
        return jax.lax.map(one, batched), (True,) * len(outs)

    return call


def gru_unsupported(x_proj, w_hh, b_hh, valid) -> str | None:
    """Why :func:`gru_recurrence_cpu` does not take these operands' shapes, or None."""
    shapes = [tuple(a.shape) for a in (x_proj, w_hh, b_hh, valid)]
    wanted = "x_proj [T, D, B, 3H], w_hh [D, 3H, H], b_hh [D, 3H] and valid [B, T]"
    if [len(s) for s in shapes] != [4, 3, 2, 2]:
        return f"it wants {wanted}; got {', '.join(map(str, shapes))}"
    (t, d, b, g), hidden = shapes[0], shapes[1][-1]
    if g != 3 * hidden or shapes[1:] != [(d, g, hidden), (d, g), (b, t)]:
        return f"it wants {wanted} of one T, D, B and H; got {', '.join(map(str, shapes))}"
    if hidden % 16:
        return f"H must be a multiple of 16; got {hidden}"
    if (dtypes := {jnp.dtype(a.dtype).name for a in (x_proj, w_hh, b_hh)}) != {"float32"}:
        return f"it computes in float32; got x_proj, w_hh and b_hh in {', '.join(sorted(dtypes))}"
    if valid.dtype != jnp.bool_:
        return f"valid must be bool (True where a step is inside its sequence); got {valid.dtype}"
    return None


def gru_recurrence_cpu(x_proj, w_hh, b_hh, valid):
    """The recurrence of :func:`hw2jax.models.gru` for all directions of one layer: x_proj
    [T, D, B, 3H] (W_ih x + b_ih, reversed within each length for the reverse direction),
    w_hh [D, 3H, H], b_hh [D, 3H], valid [B, T] bool. Returns outputs [T, D, B, H] (0 past a
    sequence's end) and the last states [D, B, H]. float32, H a multiple of 16
    (:func:`gru_unsupported`). Raises :class:`InputError` for other shapes and dtypes."""
    if (problem := gru_unsupported(x_proj, w_hh, b_hh, valid)) is not None:
        raise InputError(
            f"gru_recurrence_cpu: {problem}. hw2jax.models.gru.GRU takes [batch, time, "
            "features] inputs of any size and dtype."
        )
    return _recurrence(x_proj, w_hh, b_hh, valid)


@jax.custom_vjp
def _recurrence(x_proj, w_hh, b_hh, valid):
    return _kernel("gru_forward", *_FORWARD)(x_proj, w_hh, b_hh, valid)


def _forward(x_proj, w_hh, b_hh, valid):
    out, last, *saved = _kernel("gru_forward_save", *_FORWARD_SAVE)(x_proj, w_hh, b_hh, valid)
    return (out, last), (w_hh, valid, saved)


def _backward(residuals, cotangents):
    w_hh, valid, saved = residuals
    g_out, g_h = cotangents
    d_xp, d_w, d_b = _kernel("gru_backward", *_BACKWARD)(w_hh, valid, *saved, g_out, g_h)
    return d_xp, d_w, d_b, None


_recurrence.defvjp(_forward, _backward)
