"""Part 1: the scalar RNN h_t = w_in*x_t + w_rec*h_{t-1}, y_t = sigmoid(w_out*h_t).

With the assignment's weights (w_in=1, w_rec=-1, w_out=1000) the final state is an
alternating sum of the inputs, so y_T tells whether the even-position inputs outweigh the
odd-position ones (positions counted from 1, T even).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hw2jax.errors import InputError, InputTypeError

__all__ = ["even_minus_odd", "final_state_closed_form", "run"]


def _as_float_sequence(x: jax.typing.ArrayLike, name: str = "x") -> jax.Array:
    try:
        x = jnp.asarray(x)
    except TypeError:  # a string, a ragged list, an object
        raise InputTypeError(
            f"{name} must be an array of real numbers [..., T], got {type(x).__name__} "
            f"{str(x)[:40]!r}."
        ) from None
    if x.ndim == 0:
        raise InputError(
            f"{name} must have a time axis: expected shape [..., T], got a scalar. "
            f"Wrap a single step as [value]."
        )
    if not (
        jnp.issubdtype(x.dtype, jnp.floating)
        or jnp.issubdtype(x.dtype, jnp.integer)
        or x.dtype == jnp.bool_
    ):
        raise InputTypeError(f"{name} must be real numbers, got dtype {x.dtype}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def run(
    x: jax.typing.ArrayLike,
    *,
    w_in: float = 1.0,
    w_rec: float = -1.0,
    w_out: float = 1000.0,
) -> tuple[jax.Array, jax.Array]:
    """Runs the recurrence over the last axis of ``x`` ([..., T]) from h_0 = 0.

    Returns ``(h, y)``, both shaped like ``x``, holding every step. Built on
    ``lax.scan``, so it jit-compiles, vmaps and differentiates.
    """
    x = _as_float_sequence(x)

    def step(h_prev, x_t):
        h_t = w_in * x_t + w_rec * h_prev
        return h_t, h_t

    h0 = jnp.zeros(x.shape[:-1], x.dtype)
    _, hs = jax.lax.scan(step, h0, jnp.moveaxis(x, -1, 0))
    h = jnp.moveaxis(hs, 0, -1)
    return h, jax.nn.sigmoid(w_out * h)


def final_state_closed_form(
    x: jax.typing.ArrayLike, *, w_in: float = 1.0, w_rec: float = -1.0
) -> jax.Array:
    """h_T without the recurrence: w_in * sum_t w_rec**(T-t) * x_t.

    For w_rec = -1 this is the alternating sum ending in +x_T.
    """
    x = _as_float_sequence(x)
    t = x.shape[-1]
    powers = jnp.asarray(w_rec, x.dtype) ** jnp.arange(t - 1, -1, -1, dtype=x.dtype)
    return w_in * jnp.sum(x * powers, axis=-1)


def even_minus_odd(x: jax.typing.ArrayLike) -> jax.Array:
    """Sum of inputs at even positions minus the sum at odd ones (positions from 1).

    For even T this equals h_T of the assignment's RNN, so y_T = sigmoid(1000 * this).
    """
    x = _as_float_sequence(x)
    return jnp.sum(x[..., 1::2], axis=-1) - jnp.sum(x[..., 0::2], axis=-1)
