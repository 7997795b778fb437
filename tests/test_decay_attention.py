"""Retention and gated linear attention against explicit float64 recurrences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import qkv

from hw2jax import attention


def gla_ref_np(q, k, v, log_alpha):
    """float64: S_t = diag(exp(a_t)) S_(t-1) + k_t v_t^T, out_t = S_t^T q_t, step by step."""
    q, k, v, a = (np.asarray(x, np.float64) for x in (q, k, v, log_alpha))
    b, t, h, d = k.shape
    s = np.zeros((b, h, d, v.shape[-1]))
    out = np.zeros((b, t, h, v.shape[-1]))
    for i in range(t):
        s = np.exp(a[:, i])[..., None] * s + k[:, i, :, :, None] * v[:, i, :, None, :]
        out[:, i] = np.einsum("bhd,bhde->bhe", q[:, i], s)
    return out


def retention_ref_np(q, k, v, gamma):
    """float64: out_i = sum_{j <= i} gamma_h^(i - j) (q_i . k_j) v_j, term by term."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, gamma))
    out = np.zeros(q.shape[:3] + v.shape[-1:])
    for i in range(q.shape[1]):
        for j in range(i + 1):
            w = np.einsum("bhd,bhd->bh", q[:, i], k[:, j]) * g[None] ** (i - j)
            out[:, i] += w[..., None] * v[:, j]
    return out


def _loss64(fn, w):
    with jax.enable_x64(True):
        return lambda *args: jnp.sum(fn(*args) * w)


@pytest.mark.parametrize("method", ["parallel", "recurrent", "chunked"])
def test_retention_matches_the_float64_formula_with_gradients(method):
    q, k, v = qkv((2, 13, 3, 4), e=5, seed=3)
    gamma = jnp.array([0.5, 0.9, 1.0])
    out = attention.retention(q, k, v, gamma=gamma, implementation=method, chunk_size=4)
    np.testing.assert_allclose(out, retention_ref_np(q, k, v, gamma), rtol=1e-5, atol=1e-5)
    w = np.random.default_rng(0).standard_normal(out.shape)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(a, jnp.float64) for a in (q, k, v)]
        ref = jax.grad(
            lambda q, k, v: jnp.sum(
                attention.retention(
                    q, k, v, gamma=jnp.asarray(gamma, jnp.float64), implementation="parallel"
                )
                * w
            ),
            (0, 1, 2),
        )(*args64)
    ours = jax.grad(
        lambda q, k, v: jnp.sum(
            attention.retention(q, k, v, gamma=gamma, implementation=method, chunk_size=4)
            * jnp.asarray(w, jnp.float32)
        ),
        (0, 1, 2),
    )(q, k, v)
    for g_ours, g_ref in zip(ours, ref, strict=True):
        np.testing.assert_allclose(g_ours, np.asarray(g_ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["recurrent", "chunked"])
def test_gated_linear_attention_matches_the_float64_recurrence_with_gradients(method):
    q, k, v = qkv((2, 11, 2, 4), e=3, seed=5)
    log_alpha = -jnp.abs(jax.random.normal(jax.random.key(7), k.shape))
    out = attention.gated_linear_attention(q, k, v, log_alpha, implementation=method, chunk_size=4)
    np.testing.assert_allclose(out, gla_ref_np(q, k, v, log_alpha), rtol=1e-5, atol=1e-5)
    never_forgets = log_alpha.at[:, :, :, 0].set(0.0)  # a decay of exactly 1 is allowed
    out = attention.gated_linear_attention(q, k, v, never_forgets, implementation=method)
    np.testing.assert_allclose(out, gla_ref_np(q, k, v, never_forgets), rtol=1e-5, atol=1e-5)
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (q, k, v, log_alpha)]
        fn = lambda q, k, v, a: attention.gated_linear_attention(  # noqa: E731
            q, k, v, a, implementation=method, chunk_size=4
        )
        check_grads(fn, args, order=1, modes=("rev",), eps=1e-5)
        ref_grads = jax.grad(lambda *a: jnp.sum(_gla_jnp(*a) ** 2), (0, 1, 2, 3))(*args)
        ours = jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), (0, 1, 2, 3))(*args)
    for g_ours, g_ref in zip(ours, ref_grads, strict=True):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-8, atol=1e-8)


def _gla_jnp(q, k, v, a):
    """The float64 recurrence again, as a Python loop jax can differentiate."""
    b, t, h, d = k.shape
    s = jnp.zeros((b, h, d, v.shape[-1]), q.dtype)
    outs = []
    for i in range(t):
        s = jnp.exp(a[:, i])[..., None] * s + k[:, i, :, :, None] * v[:, i, :, None, :]
        outs.append(jnp.einsum("bhd,bhde->bhe", q[:, i], s))
    return jnp.stack(outs, 1)


def test_chunked_gla_stays_finite_at_strong_decay():
    """log_alpha = -20 per step: exp of its running sum over a chunk underflows to 0, and a
    naive factorisation would compute exp(+20 * C); ours never exponentiates a positive."""
    q, k, v = qkv((1, 64, 2, 8), seed=9)
    log_alpha = jnp.full(k.shape, -20.0)
    out = attention.gated_linear_attention(
        q, k, v, log_alpha, implementation="chunked", chunk_size=16
    )
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out, gla_ref_np(q, k, v, log_alpha), rtol=1e-5, atol=1e-5)
    grads = jax.grad(
        lambda q: attention.gated_linear_attention(q, k, v, log_alpha, chunk_size=16).sum()
    )(q)
    assert bool(jnp.all(jnp.isfinite(grads)))


def test_bad_decays_name_the_problem():
    q, k, v = qkv((1, 4, 2, 4), seed=1)
    with pytest.raises(ValueError, match="one decay per head"):
        attention.retention(q, k, v, gamma=jnp.ones(3))
    with pytest.raises(ValueError, match=r"gamma must lie in \(0, 1\]"):
        attention.retention(q, k, v, gamma=jnp.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="log_alpha must have k's shape"):
        attention.gated_linear_attention(q, k, v, jnp.zeros((1, 4, 2, 3)))


@pytest.mark.parametrize(
    "name",
    ["retention", "gla", "cosformer", "cosformer causal", "performer", "performer causal"],
)
def test_linear_time_variants_keep_linear_memory_at_128k(name):
    t, h, d = 131072, 4, 64
    spec = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
    causal = name.endswith("causal")
    fns = {
        "retention": lambda q, k, v: attention.retention(q, k, v, gamma=jnp.full((h,), 0.9)),
        "gla": lambda q, k, v: attention.gated_linear_attention(q, k, v, -jnp.abs(q) / 8),
        "cosformer": lambda q, k, v: attention.cosformer_attention(q, k, v, causal=causal),
        "performer": lambda q, k, v: attention.performer_attention(
            q, k, v, causal=causal, num_features=64, key=jax.random.key(0)
        ),
    }
    fn = jax.jit(fns[name.split()[0]])
    temp = fn.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
    assert temp < 2 * 2**30, f"{temp / 2**30:.2f} GiB of temporaries"
