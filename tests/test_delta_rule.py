"""The delta rule (DeltaNet, Gated DeltaNet), scalar-decay GLA, sliding-window softmax and Based's
Taylor features, each against a float64 formula written as a plain loop."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import qkv
from test_decay_attention import gla_ref_np

from hw2jax import attention
from hw2jax.attention import dispatch
from hw2jax.attention.delta_rule import delta_rule_attention, l2_normalise
from hw2jax.attention.linear import taylor_features
from hw2jax.attention.sliding_window import sliding_window_attention


def delta_ref(q, k, v, beta, log_alpha, xp=np):
    """S_t = alpha_t S_(t-1) (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t, one step
    and one (batch, head) at a time, with the matrices written out. ``xp``: numpy (float64
    values) or jax.numpy (float64 gradients, under enable_x64)."""
    b, t, h, dk = k.shape
    eye = xp.eye(dk)
    rows = []
    for bi in range(b):
        per_head = []
        for hi in range(h):
            s = xp.zeros((v.shape[-1], dk))
            outs = []
            for i in range(t):
                kt = k[bi, i, hi][:, None]
                alpha, bt = xp.exp(log_alpha[bi, i, hi]), beta[bi, i, hi]
                s = alpha * s @ (eye - bt * kt @ kt.T) + bt * v[bi, i, hi][:, None] @ kt.T
                outs.append(s @ q[bi, i, hi])
            per_head.append(xp.stack(outs))
        rows.append(xp.stack(per_head, axis=1))
    return xp.stack(rows)


@jax.jit
def _delta_ref_gradients(q, k, v, beta, log_alpha, w):
    """The float64 loop's gradients, compiled as one program (op by op, each of its ~1,000
    small operations would compile on its own)."""
    return jax.grad(lambda *xs: jnp.sum(delta_ref(*xs, xp=jnp) * w), argnums=(0, 1, 2, 3, 4))(
        q, k, v, beta, log_alpha
    )


def delta_inputs(shape, e, seed, gated, beta_range=(0.1, 1.0), decay_range=(-2.0, 0.0)):
    q, k, v = qkv(shape, e=e, seed=seed)
    rng = np.random.default_rng(seed)
    beta = jnp.asarray(rng.uniform(*beta_range, shape[:3]), jnp.float32)
    log_alpha = jnp.asarray(rng.uniform(*decay_range, shape[:3]), jnp.float32) if gated else None
    return l2_normalise(q), l2_normalise(k), v, beta, log_alpha


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("implementation", ["recurrent", "chunked"])
def test_delta_rule_matches_the_float64_loop_with_gradients(implementation, gated):
    q, k, v, beta, log_alpha = delta_inputs((2, 13, 2, 4), e=3, seed=1, gated=gated)
    a = log_alpha if gated else jnp.zeros_like(beta)
    out = delta_rule_attention(
        q, k, v, beta, log_alpha=log_alpha, implementation=implementation, chunk_size=4
    )
    ref = delta_ref(*(np.asarray(x, np.float64) for x in (q, k, v, beta, a)))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    if implementation == "chunked":  # chunks of one step, and one chunk of all 13
        for chunk_size in (1, 13):
            got = delta_rule_attention(q, k, v, beta, log_alpha=log_alpha, chunk_size=chunk_size)
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"{chunk_size}")

    w = np.random.default_rng(0).standard_normal(out.shape)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, beta, a)]
        grads_ref = _delta_ref_gradients(*args64, jnp.asarray(w))

    def loss(q, k, v, beta, a):
        out = delta_rule_attention(
            q, k, v, beta, log_alpha=a, implementation=implementation, chunk_size=4
        )
        return jnp.sum(out * jnp.asarray(w, jnp.float32))

    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, beta, a)
    for ours, theirs in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-4, atol=1e-4)


def test_chunked_delta_rule_is_stable_at_long_t_with_beta_near_1_and_decays_near_0():
    """T = 4,096: beta in [0.95, 1] makes I - beta k k^T nearly singular, and log decays down
    to -20 (alpha ~ 2e-9) drive the running products of the chunked form towards 0."""
    q, k, v, beta, log_alpha = delta_inputs(
        (1, 4096, 2, 8), e=8, seed=2, gated=True, beta_range=(0.95, 1.0), decay_range=(-20.0, 0.0)
    )
    out = delta_rule_attention(q, k, v, beta, log_alpha=log_alpha, chunk_size=64)
    assert bool(jnp.all(jnp.isfinite(out)))
    ref = delta_ref(*(np.asarray(x, np.float64) for x in (q, k, v, beta, log_alpha)))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    plain = delta_rule_attention(q, k, v, beta, chunk_size=64)  # no decay: the state lives long
    ref = delta_ref(*(np.asarray(x, np.float64) for x in (q, k, v, beta, 0 * log_alpha)))
    np.testing.assert_allclose(plain, ref, rtol=1e-4, atol=1e-4)


def test_delta_rule_refuses_bad_shapes_naming_them():
    q, k, v, beta, _ = delta_inputs((1, 5, 2, 4), e=4, seed=3, gated=False)
    with pytest.raises(ValueError, match=r"beta must hold one write strength .* \(1, 5, 2\)"):
        delta_rule_attention(q, k, v, beta[..., None])
    with pytest.raises(ValueError, match="a decay per key dimension is gated_linear_attention"):
        delta_rule_attention(q, k, v, beta, log_alpha=jnp.zeros(k.shape))
    with pytest.raises(ValueError, match="choose chunked or recurrent"):
        delta_rule_attention(q, k, v, beta, implementation="parallel")
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        delta_rule_attention(q, k, v, beta, chunk_size=0)


@pytest.mark.parametrize("implementation", ["recurrent", "chunked"])
def test_gla_takes_one_scalar_decay_per_head_and_step(implementation):
    """Mamba-2's SSD form: log_alpha [B, T, H], the same decay for every key dimension."""
    q, k, v = qkv((2, 11, 3, 4), e=5, seed=4)
    log_alpha = -jnp.abs(jax.random.normal(jax.random.key(1), q.shape[:3]))
    out = attention.gated_linear_attention(
        q, k, v, log_alpha, implementation=implementation, chunk_size=4
    )
    ref = gla_ref_np(q, k, v, np.broadcast_to(np.asarray(log_alpha)[..., None], k.shape))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def sliding_ref(q, k, v, window):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros(q.shape[:3] + v.shape[-1:])
    for i in range(q.shape[1]):
        lo = max(0, i - window + 1)
        scores = np.einsum("bhd,bjhd->bhj", q[:, i], k[:, lo : i + 1]) / math.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[:, i] = np.einsum("bhj,bjhe->bhe", weights, v[:, lo : i + 1])
    return out


@pytest.mark.parametrize("window", [1, 3, 4, 13, 50])
def test_sliding_window_matches_the_float64_loop_with_gradients(window):
    q, k, v = qkv((2, 13, 2, 4), e=3, seed=6)
    out = sliding_window_attention(q, k, v, window=window)
    np.testing.assert_allclose(out, sliding_ref(q, k, v, window), rtol=1e-5, atol=1e-5)
    # Gradients: against the same loop in float64 jax, through a dense masked softmax.
    w = np.random.default_rng(0).standard_normal(out.shape)
    t = q.shape[1]
    gap = np.arange(t)[:, None] - np.arange(t)[None, :]
    with jax.enable_x64(True):

        def dense(q, k, v):
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
            s = jnp.where((gap >= 0) & (gap < window), s, -jnp.inf)
            return jnp.sum(jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(s, -1), v) * w)

        ref = jax.jit(jax.grad(dense, (0, 1, 2)))(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
    ours = jax.jit(
        jax.grad(
            lambda q, k, v: jnp.sum(sliding_window_attention(q, k, v, window=window) * w),
            (0, 1, 2),
        )
    )(q, k, v)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-5)


def test_sliding_window_memory_grows_with_t_times_window_not_t_squared():
    q, k, v = qkv((1, 8192, 1, 8), e=8, seed=0)
    compiled = jax.jit(lambda q, k, v: sliding_window_attention(q, k, v, window=64))
    memory = compiled.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    assert memory < 8192 * 2 * 64 * 4 * 4  # a few [T, 2 window] float32 buffers, not [T, T]


def test_taylor_features_give_1_plus_s_plus_half_s_squared():
    q, k, _ = qkv((3, 7, 2, 5), seed=7)
    s = np.einsum("bthd,bthd->bth", np.asarray(q, np.float64), np.asarray(k, np.float64))
    s /= math.sqrt(5)
    dots = jnp.sum(taylor_features(q) * taylor_features(k), -1)
    assert taylor_features(q).shape[-1] == 1 + 5 + 25
    np.testing.assert_allclose(dots, 1 + s + s**2 / 2, rtol=1e-5, atol=1e-5)


def taylor_linear_ref(q, k, v, causal, xp=np):
    """float64 loop: weights 1 + s + s^2 / 2 with s = q_i . k_j / sqrt(d), normalised. ``xp``:
    numpy (float64 values) or jax.numpy (float64 gradients, under enable_x64)."""
    if xp is np:
        q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    rows = []
    for i in range(q.shape[1]):
        last = i + 1 if causal else q.shape[1]
        s = xp.einsum("bhd,bjhd->bhj", q[:, i], k[:, :last]) / math.sqrt(q.shape[-1])
        weights = 1 + s + s**2 / 2
        rows.append(xp.einsum("bhj,bjhe->bhe", weights, v[:, :last]) / weights.sum(-1)[..., None])
    return xp.stack(rows, axis=1)


@pytest.mark.parametrize(
    "causal,method",
    [(False, "auto"), (False, "chunked"), (True, "auto"), (True, "chunked"), (True, "recurrent")],
)
def test_linear_attention_with_taylor_features_matches_the_float64_loop(causal, method):
    # T = 9 keys against 1 + 4 + 16 features: auto takes the parallel form.
    q, k, v = qkv((2, 9, 2, 4), e=3, seed=8)
    taylor = functools.partial(
        attention.linear_attention,
        causal=causal,
        feature_map="taylor",
        implementation=method,
        chunk_size=4,
    )
    out = taylor(q, k, v)
    np.testing.assert_allclose(out, taylor_linear_ref(q, k, v, causal), rtol=1e-4, atol=1e-5)
    w = np.random.default_rng(3).standard_normal(out.shape)
    grads = jax.grad(lambda *a: jnp.sum(taylor(*a) * jnp.asarray(w, jnp.float32)), (0, 1, 2))(
        q, k, v
    )
    for ours, theirs in zip(grads, _taylor_ref_grads(causal), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@functools.cache
def _taylor_ref_grads(causal):
    """The float64 loop's gradients for the inputs and cotangent above, once per form: every
    implementation is checked against the same numbers."""
    q, k, v = qkv((2, 9, 2, 4), e=3, seed=8)
    w = np.random.default_rng(3).standard_normal((2, 9, 2, 3))
    with jax.enable_x64(True):
        loss = jax.jit(lambda *a: jnp.sum(taylor_linear_ref(*a, causal, xp=jnp) * w))
        grads = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
        return tuple(np.asarray(g) for g in grads)


def test_taylor_takes_the_parallel_form_while_keys_are_fewer_than_its_features():
    assert dispatch.taylor_parallel(50, 64) and dispatch.taylor_parallel(20, 4)
    assert not dispatch.taylor_parallel(21, 4)  # 1 + 4 + 16 features
    # A ViT's shape: the 1 + 64 + 4096 features of q and k alone would take 8 x 50 x 4 x 4161
    # x 4 bytes x 2 = 53 MB; the parallel form's weights are 8 x 4 x 50 x 50 x 4 = 320 kB.
    q, k, v = qkv((8, 50, 4, 64), e=64, seed=1)
    based = jax.jit(
        jax.grad(lambda q: jnp.sum(attention.linear_attention(q, k, v, feature_map="taylor")))
    )
    memory = based.lower(q).compile().memory_analysis().temp_size_in_bytes
    assert memory < 8 * 50 * 4 * 4161 * 4


@pytest.mark.parametrize("c", [1, 5, 8, 13, 64])
def test_unit_lower_inverse_is_the_inverse(c):
    from hw2jax.attention.delta_rule import unit_lower_inverse

    rng = np.random.default_rng(c)
    m = np.tril(rng.uniform(-1, 1, (3, c, c)), -1) + np.eye(c)
    ours = np.asarray(unit_lower_inverse(jnp.asarray(m, jnp.float32)), np.float64)
    np.testing.assert_allclose(
        ours, np.linalg.inv(m), rtol=1e-4, atol=1e-4 * np.abs(np.linalg.inv(m)).max()
    )
    assert np.all(np.triu(ours, 1) == 0)
