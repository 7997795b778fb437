import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hw2jax import recurrence

int_sequences = st.lists(st.integers(-50, 50), min_size=1, max_size=24)


def python_loop(x, w_in=1.0, w_rec=-1.0):
    """Reference: the recurrence written as a plain Python loop in float64."""
    h, hs = 0.0, []
    for x_t in x:
        h = w_in * x_t + w_rec * h
        hs.append(h)
    return np.array(hs)


@settings(max_examples=60, deadline=None)
@given(int_sequences)
def test_scan_matches_python_loop_and_closed_form(xs):
    x = jnp.asarray(xs, jnp.float32)
    h, y = recurrence.run(x)
    np.testing.assert_array_equal(np.asarray(h), python_loop(xs))
    # Integers below 2**24 are exact in float32, so the closed form must match exactly.
    assert float(recurrence.final_state_closed_form(x)) == float(h[-1])
    # sigmoid(z) = (1 + tanh(z/2)) / 2 never overflows.
    np.testing.assert_allclose(y, 0.5 * (1 + np.tanh(500.0 * python_loop(xs))), rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(int_sequences.filter(lambda xs: len(xs) % 2 == 0))
def test_even_length_compares_even_and_odd_positions(xs):
    even_sum = sum(xs[1::2])  # positions 2, 4, ... counted from 1
    odd_sum = sum(xs[0::2])
    h, y = recurrence.run(jnp.asarray(xs, jnp.float32))
    assert float(h[-1]) == even_sum - odd_sum
    assert float(recurrence.even_minus_odd(jnp.asarray(xs))) == even_sum - odd_sum
    if even_sum != odd_sum:
        assert float(y[-1]) == (1.0 if even_sum > odd_sum else 0.0)
    else:
        assert float(y[-1]) == 0.5


@settings(max_examples=30, deadline=None)
@given(int_sequences.filter(lambda xs: len(xs) % 2 == 1))
def test_odd_length_flips_the_sign(xs):
    h, _ = recurrence.run(jnp.asarray(xs, jnp.float32))
    assert float(h[-1]) == sum(xs[0::2]) - sum(xs[1::2])


def test_general_weights_closed_form():
    x = jax.random.normal(jax.random.key(0), (3, 7))
    h, y = recurrence.run(x, w_in=0.5, w_rec=0.9, w_out=2.0)
    np.testing.assert_allclose(
        h[..., -1], recurrence.final_state_closed_form(x, w_in=0.5, w_rec=0.9), rtol=1e-5
    )
    for row in range(3):
        np.testing.assert_allclose(
            h[row], python_loop(np.asarray(x[row], np.float64), 0.5, 0.9), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(y, jax.nn.sigmoid(2.0 * h), rtol=1e-6)


def test_jit_vmap_and_batch_shapes_agree():
    x = jax.random.normal(jax.random.key(1), (4, 2, 9))
    h, y = recurrence.run(x)
    assert h.shape == y.shape == x.shape
    h_jit, _ = jax.jit(recurrence.run)(x)
    h_vmap, _ = jax.vmap(jax.vmap(recurrence.run))(x)
    np.testing.assert_allclose(h_jit, h, rtol=1e-6)
    np.testing.assert_allclose(h_vmap, h, rtol=1e-6)


def test_gradient_is_the_alternating_sign_pattern():
    # dh_T/dx_t = w_rec**(T-t): +1 for the last step, then alternating.
    x = jnp.arange(6.0)
    grad = jax.grad(lambda x: recurrence.run(x)[0][-1])(x)
    np.testing.assert_array_equal(grad, [-1, 1, -1, 1, -1, 1])
    # And through the sigmoid: chain rule with y_T(1 - y_T) * w_out.
    x = jnp.array([0.001, 0.0015])
    y_t = recurrence.run(x)[1][-1]
    g = jax.grad(lambda x: recurrence.run(x)[1][-1])(x)
    np.testing.assert_allclose(g, 1000.0 * y_t * (1 - y_t) * jnp.array([-1.0, 1.0]), rtol=1e-5)


def test_integer_input_is_promoted_and_scalar_is_rejected():
    h, _ = recurrence.run(jnp.array([1, 2, 3]))
    assert jnp.issubdtype(h.dtype, jnp.floating)
    with pytest.raises(ValueError, match="time axis"):
        recurrence.run(jnp.float32(1.0))
