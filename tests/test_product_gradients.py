"""The products' own backward passes on XLA's path: the dense product
(``models.layers.dot_float32_out``) and the batched one (``attention.matmul_f32``) give the
closed forms' gradients in float64; the dense weight gradient makes XLA transpose the narrower
operand rather than the wide output gradient; with bf16 inputs both multiply bf16 by the output
gradient rounded to bf16."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hw2jax.attention import dispatch, matmul_f32
from hw2jax.models.layers import dot_float32_out


def _dims(ndim: int):
    return (((ndim - 1,), (0,)), ((), ()))


def _loss(x, w, g):
    return jnp.sum(g * dot_float32_out(x, w, _dims(x.ndim)))


@pytest.mark.parametrize(
    "x_shape, width",
    [((3, 50, 64), 256), ((3, 50, 128), 64), ((7, 5), 3), ((2, 3, 4, 8), 8)],
    ids=["wider-out", "narrower-out", "2d", "4d-square"],
)
def test_dense_gradients_match_the_closed_forms_in_float64(x_shape, width):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((x_shape[-1], width)).astype(np.float32)
    g = rng.standard_normal((*x_shape[:-1], width)).astype(np.float32)
    out = dot_float32_out(jnp.asarray(x), jnp.asarray(w), _dims(x.ndim))
    dx, dw = jax.grad(_loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w), jnp.asarray(g))
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    rows = x64.reshape(-1, x64.shape[-1])
    grads = g64.reshape(-1, width)
    np.testing.assert_allclose(out, (rows @ w64).reshape(out.shape), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, (grads @ w64.T).reshape(x.shape), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, rows.T @ grads, rtol=1e-4, atol=1e-4)
    assert dx.dtype == dw.dtype == jnp.float32


def _wide_copies(dense, rows: int, width: int) -> int:
    """Instructions in the compiled weight gradient whose result is the output gradient
    transposed, f32[width, rows]."""
    x = jnp.ones((rows // 50, 50, 64), jnp.float32)
    w = jnp.ones((64, width), jnp.float32)
    grad = jax.jit(jax.grad(lambda w, x: jnp.sum(dense(x, w, _dims(x.ndim)) ** 2)))
    text = grad.lower(w, x).compile().as_text()
    return len(re.findall(rf"= f32\[{width},{rows}\]", text))


def test_the_weight_gradient_transposes_the_narrow_input_not_the_wide_gradient():
    # JAX's own rule for dot_general makes XLA's CPU dot copy g^T (the ViT's regrouped attention:
    # ~11 ms a layer on 128 images); ours contracts x's leading axes with g's, so x [rows, 64]
    # is the operand XLA transposes.
    assert _wide_copies(jax.lax.dot_general, 6400, 256) >= 1  # the layout this guards against
    assert _wide_copies(dot_float32_out, 6400, 256) == 0


def test_bf16_gradients_multiply_bf16_with_the_output_gradient_rounded():
    # As torch's autocast and the AMX kernel do; JAX's own rule would upcast x and w and
    # multiply in float32 (a third slower in the fine-tuning step without AMX).
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 9, 48)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((48, 40)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((4, 9, 40)), jnp.float32)
    dx, dw = jax.grad(_loss, argnums=(0, 1))(x, w, g)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    x64, w64 = (np.asarray(a, np.float64) for a in (x, w))
    g64 = np.asarray(g.astype(jnp.bfloat16), np.float64)  # g rounded, then exact products
    rows, grads = x64.reshape(-1, 48), g64.reshape(-1, 40)
    want_dx = (grads @ w64.T).reshape(x.shape)
    want_dw = rows.T @ grads
    # One bf16 rounding of each float32 result: a relative error of at most 2^-8.
    np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=2**-8, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw, np.float64), want_dw, rtol=2**-8, atol=1e-6)
    jaxpr = jax.make_jaxpr(jax.grad(_loss, argnums=(0, 1)))(x, w, g)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) >= 2  # the two gradient products (the forward may sit in a sub-jaxpr)
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (False, True), (True, False)])
def test_bf16_batched_gradients_match_the_closed_forms(monkeypatch, transpose_a, transpose_b):
    monkeypatch.setenv(dispatch.MATMUL_ENV, "xla")  # the path of CPUs without AMX
    rng = np.random.default_rng(2)
    m, k, n = 50, 64, 70
    a = jnp.asarray(rng.standard_normal((3, k, m) if transpose_a else (3, m, k)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((3, n, k) if transpose_b else (3, k, n)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((3, m, n)), jnp.float32)

    def loss(a, b):
        return jnp.sum(g * matmul_f32(a, b, transpose_a=transpose_a, transpose_b=transpose_b))

    da, db = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
    assert da.dtype == db.dtype == jnp.bfloat16
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    g64 = np.asarray(g.astype(jnp.bfloat16), np.float64)
    op_a = np.swapaxes(a64, 1, 2) if transpose_a else a64
    op_b = np.swapaxes(b64, 1, 2) if transpose_b else b64
    d_op_a, d_op_b = g64 @ np.swapaxes(op_b, 1, 2), np.swapaxes(op_a, 1, 2) @ g64
    want_a = np.swapaxes(d_op_a, 1, 2) if transpose_a else d_op_a
    want_b = np.swapaxes(d_op_b, 1, 2) if transpose_b else d_op_b
    np.testing.assert_allclose(np.asarray(da, np.float64), want_a, rtol=2**-8, atol=1e-6)
    np.testing.assert_allclose(np.asarray(db, np.float64), want_b, rtol=2**-8, atol=1e-6)
    dots = [e for e in jax.make_jaxpr(jax.grad(loss, (0, 1)))(a, b).jaxpr.eqns]
    dots = [e for e in dots if e.primitive.name == "dot_general"]
    assert len(dots) >= 2 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
