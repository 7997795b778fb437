"""cosFormer and Performer against explicit float64 T x T formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import qkv, ref_softmax_np

from hw2jax import attention


def cosformer_ref_np(q, k, v, causal, eps=1e-6):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    t = q.shape[1]
    w = np.einsum("bqhd,bkhd->bhqk", np.maximum(q, 0), np.maximum(k, 0))
    i = np.arange(t)
    w = w * np.cos(np.pi / 2 * (i[:, None] - i[None, :]) / t)
    if causal:
        w = w * np.tril(np.ones((t, t)))
    return np.einsum("bhqk,bkhd->bqhd", w, v) / (w.sum(-1)[..., None].transpose(0, 2, 1, 3) + eps)


def performer_ref_np(q, k, v, w, causal):
    """float64: phi(x) = exp(w . x' - |x'|^2/2) / sqrt(m), x' = x / d^(1/4), no stabiliser."""
    q, k, v, w = (np.asarray(a, np.float64) for a in (q, k, v, w))
    d, m = q.shape[-1], w.shape[0]

    def phi(x):
        x = x / d**0.25
        return np.exp(x @ w.T - 0.5 * np.sum(x * x, -1, keepdims=True)) / np.sqrt(m)

    a = np.einsum("bqhm,bkhm->bhqk", phi(q), phi(k))
    if causal:
        a = a * np.tril(np.ones((q.shape[1],) * 2))
    return np.einsum("bhqk,bkhd->bqhd", a, v) / a.sum(-1)[..., None].transpose(0, 2, 1, 3)


@pytest.mark.parametrize("causal", [False, True])
def test_cosformer_matches_the_float64_formula_with_gradients(causal):
    q, k, v = qkv((2, 19, 2, 4), e=3, seed=8)
    out = attention.cosformer_attention(q, k, v, causal=causal, chunk_size=8)
    np.testing.assert_allclose(out, cosformer_ref_np(q, k, v, causal), rtol=1e-4, atol=1e-5)
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (q, k, v)]
        fn = lambda q, k, v: attention.cosformer_attention(q, k, v, causal=causal, chunk_size=8)  # noqa: E731
        check_grads(fn, args, order=1, modes=("rev",), eps=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_is_exact_given_its_random_matrix(causal):
    q, k, v = qkv((1, 17, 2, 8), e=4, seed=2)
    key = jax.random.key(3)
    w = attention.performer_projection(key, 32, 8)
    out = attention.performer_attention(q, k, v, causal=causal, num_features=32, key=key)
    np.testing.assert_allclose(out, performer_ref_np(q, k, v, w, causal), rtol=1e-4, atol=1e-5)


def test_performer_error_against_softmax_falls_as_features_grow():
    q, k, v = (0.5 * a for a in qkv((1, 32, 2, 8), seed=4))
    exact = ref_softmax_np(q, k, v)
    errors = {}
    for m in (8, 64, 512):
        errs = [
            np.mean(
                np.abs(
                    attention.performer_attention(q, k, v, num_features=m, key=jax.random.key(s))
                    - exact
                )
            )
            for s in range(6)
        ]
        errors[m] = float(np.mean(errs))
    assert errors[8] > errors[64] > errors[512], errors
    assert errors[512] < 0.05


def test_orthogonal_projection_rows_are_orthogonal_within_blocks():
    w = np.asarray(attention.performer_projection(jax.random.key(0), 16, 8))
    block = w[:8] / np.linalg.norm(w[:8], axis=1, keepdims=True)
    np.testing.assert_allclose(block @ block.T, np.eye(8), atol=1e-5)
