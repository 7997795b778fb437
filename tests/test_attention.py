import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hw2jax import attention, kernels, recurrence
from hw2jax.errors import Hw2jaxError

# ------------------------------------------------------------------ explicit O(T^2) references

PHI_NP = {
    "elu": lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0))),
    "relu": lambda x: np.maximum(x, 0.0),
    "identity": lambda x: x,
}


def ref_softmax_weights_np(q, k, causal=False, key_bias=None, scale=None):
    """softmax(scale q k^T + key_bias) [B, H, T, T] in float64; key_bias [B, T] is added to
    each key's scores; scale defaults to 1/sqrt(D)."""
    q, k = (np.asarray(a, np.float64) for a in (q, k))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if key_bias is not None:
        logits = logits + np.asarray(key_bias, np.float64)[:, None, None, :]
    if causal:
        t = q.shape[1]
        logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


def ref_softmax_np(q, k, v, causal=False, key_bias=None, scale=None):
    """float64 softmax attention (:func:`ref_softmax_weights_np`'s weights times v)."""
    w = ref_softmax_weights_np(q, k, causal, key_bias, scale)
    return np.einsum("bhqk,bkhd->bqhd", w, np.asarray(v, np.float64))


def ref_linear_np(q, k, v, causal, feature_map, eps=1e-6):
    """Masked phi(Q) phi(K)^T, then normalise each row."""
    phi = PHI_NP[feature_map]
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    a = np.einsum("bqhd,bkhd->bhqk", phi(q), phi(k))
    if causal:
        t = q.shape[1]
        a = a * np.tril(np.ones((t, t)))
    num = np.einsum("bhqk,bkhe->bqhe", a, v)
    den = a.sum(-1).transpose(0, 2, 1)[..., None]
    return num / (den + eps)


def ref_linear_jnp(q, k, v, causal):
    """The same explicit formula in jnp (elu map), for comparing gradients."""
    fq, fk = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    a = jnp.einsum("bqhd,bkhd->bhqk", fq, fk)
    if causal:
        a = a * jnp.tril(jnp.ones((q.shape[1], q.shape[1])))
    return jnp.einsum("bhqk,bkhe->bqhe", a, v) / (a.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)


def qkv(shape, e=None, seed=0, scale=1.0):
    b, t, h, d = shape
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        scale * jax.random.normal(kq, (b, t, h, d)),
        scale * jax.random.normal(kk, (b, t, h, d)),
        jax.random.normal(kv, (b, t, h, e or d)),
    )


SHAPES = [(1, 1, 1, 4), (2, 7, 3, 5), (1, 33, 2, 8), (2, 130, 4, 16)]

# ---------------------------------------------------------------------- softmax attention


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_attention_matches_reference(shape, causal):
    q, k, v = qkv(shape, e=shape[-1] + 3)
    out = attention.softmax_attention(q, k, v, causal=causal)
    np.testing.assert_allclose(out, ref_softmax_np(q, k, v, causal), rtol=1e-5, atol=1e-5)


def test_softmax_attention_matches_jax_nn():
    q, k, v = qkv((2, 40, 4, 16), seed=3)
    for causal in (False, True):
        expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
        np.testing.assert_allclose(
            attention.softmax_attention(q, k, v, causal=causal), expected, atol=1e-5
        )


# ----------------------------------------------------------------------- linear attention


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize(
    "causal,method", [(False, "chunked"), (True, "chunked"), (True, "recurrent")]
)
def test_linear_attention_matches_explicit_quadratic_form(shape, feature_map, causal, method):
    q, k, v = qkv(shape, e=shape[-1] + 1, seed=shape[1])
    out = attention.linear_attention(
        q, k, v, causal=causal, feature_map=feature_map, implementation=method, chunk_size=16
    )
    expected = ref_linear_np(q, k, v, causal, feature_map)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("t,chunk", [(1, 64), (5, 2), (64, 64), (100, 7), (257, 64)])
def test_causal_chunked_and_recurrent_agree(t, chunk):
    q, k, v = qkv((2, t, 2, 8), seed=t)
    chunked = attention.linear_attention(q, k, v, causal=True, chunk_size=chunk)
    recurrent = attention.linear_attention(q, k, v, causal=True, implementation="recurrent")
    np.testing.assert_allclose(chunked, recurrent, rtol=1e-5, atol=1e-5)


def test_causal_output_ignores_the_future():
    q, k, v = qkv((1, 20, 2, 4), seed=5)
    base = attention.linear_attention(q, k, v, causal=True)
    changed = attention.linear_attention(
        q, k.at[:, 10:].set(3.0), v.at[:, 10:].set(-7.0), causal=True
    )
    np.testing.assert_allclose(base[:, :10], changed[:, :10], rtol=1e-6)
    assert not np.allclose(base[:, 10:], changed[:, 10:])


@pytest.mark.parametrize(
    "causal,method", [(False, "chunked"), (True, "chunked"), (True, "recurrent")]
)
def test_linear_attention_gradients_match_reference(causal, method):
    q, k, v = qkv((2, 19, 2, 6), seed=11)
    w = jax.random.normal(jax.random.key(99), v.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    ours = jax.grad(
        loss(
            lambda q, k, v: attention.linear_attention(
                q, k, v, causal=causal, implementation=method, chunk_size=4
            )
        ),
        argnums=(0, 1, 2),
    )(q, k, v)
    ref = jax.grad(loss(lambda q, k, v: ref_linear_jnp(q, k, v, causal)), argnums=(0, 1, 2))(
        q, k, v
    )
    for g_ours, g_ref in zip(ours, ref, strict=True):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-5)


def explicit_linear_jnp(q, k, v, feature_map, causal=True, eps=1e-6):
    """Linear attention as the (masked) T x T formula, for float64 gradients."""
    phi = attention.FEATURE_MAPS[feature_map]
    a = jnp.einsum("bqhd,bkhd->bhqk", phi(q), phi(k))
    if causal:
        a = a * jnp.tril(jnp.ones((q.shape[1],) * 2))
    num = jnp.einsum("bhqk,bkhe->bqhe", a, v)
    return num / (a.sum(-1).transpose(0, 2, 1)[..., None] + eps)


# eps = 5, near the denominators: at the default 1e-6 an implementation that dropped it, or
# kept its own, would pass every other test.
@pytest.mark.parametrize(
    "causal,method",
    [(False, m) for m in ("chunked", "parallel", "fused_cpu")]
    + [(True, m) for m in ("chunked", "recurrent", "pallas", "parallel", "fused_cpu")],
)
def test_every_linear_attention_takes_the_eps_given(causal, method):
    if method == "fused_cpu" and kernels.build_error():
        pytest.skip(f"the fused CPU kernel cannot be built here: {kernels.build_error()}")
    q, k, v = qkv((2, 37, 2, 16), seed=3)
    g = np.random.default_rng(4).standard_normal(v.shape).astype(np.float32)

    def ours(q, k, v):
        return attention.linear_attention(
            q, k, v, causal=causal, eps=5.0, implementation=method, chunk_size=16
        )

    out, pullback = jax.vjp(ours, q, k, v)
    with jax.enable_x64(True):
        x64 = [jnp.asarray(a, jnp.float64) for a in (q, k, v, g)]
        formula = functools.partial(explicit_linear_jnp, feature_map="elu", causal=causal, eps=5.0)
        want, ref_pullback = jax.vjp(formula, *x64[:3])
        refs = ref_pullback(x64[3])
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)
    for got, ref in zip(pullback(jnp.asarray(g)), refs, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("feature_map", ["elu", "relu", "identity"])
@pytest.mark.parametrize(
    "method,t,chunk,d,e",
    [
        ("pallas", 37, 8, 6, 5),
        ("pallas", 16, 16, 6, 5),
        ("pallas", 5, 64, 6, 5),
        # The fused CPU kernels' chunks are 64: T below, at and across them.
        ("fused_cpu", 1, 64, 16, 16),
        ("fused_cpu", 64, 64, 48, 48),
        ("fused_cpu", 130, 64, 32, 32),
    ],
)
def test_chunk_kernels_match_float64_with_gradients(feature_map, method, t, chunk, d, e):
    """The Pallas kernel (interpret mode off a GPU) and the fused CPU kernels against the
    explicit float64 formula: values, and gradients through the kernels' own backward pass."""
    if method == "fused_cpu" and kernels.build_error():
        pytest.skip(f"the fused CPU kernel cannot be built here: {kernels.build_error()}")
    q, k, v = qkv((2, t, 2, d), e=e, seed=t + chunk)
    if feature_map == "identity":  # a positive denominator, as the identity map needs
        q, k = jnp.abs(q) + 0.5, jnp.abs(k) + 0.5
    w = jax.random.normal(jax.random.key(7), v.shape)

    def loss(q, k, v):
        out = attention.linear_attention(
            q, k, v, causal=True, feature_map=feature_map, implementation=method, chunk_size=chunk
        )
        return jnp.sum(out * w), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    jax.effects_barrier()
    np.testing.assert_allclose(out, ref_linear_np(q, k, v, True, feature_map), rtol=2e-5, atol=2e-5)
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (q, k, v)]
        w64 = jnp.asarray(w, jnp.float64)
        expected = jax.grad(
            lambda q, k, v: jnp.sum(explicit_linear_jnp(q, k, v, feature_map) * w64), (0, 1, 2)
        )(*args)
        expected = [np.asarray(g) for g in expected]
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_recurrent_custom_vjp_against_finite_differences():
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        q, k, v = (a.astype(jnp.float64) for a in qkv((1, 6, 2, 3), seed=4))

        def fn(q, k, v):
            return attention.linear_attention(q, k, v, causal=True, implementation="recurrent")

        check_grads(fn, (q, k, v), order=2, modes=("rev",), eps=1e-4)


@pytest.fixture
def lowering_for_gpu(monkeypatch):
    """jax.default_backend() says "gpu", so the kernels trace as they would on one; caches are
    cleared on both sides, so no GPU trace is reused on this CPU nor a CPU trace here."""
    jax.clear_caches()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    yield lambda fn, *args: jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    monkeypatch.undo()
    jax.clear_caches()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t,d,e", [(1000, 64, 64), (37, 48, 40)])
def test_pallas_kernels_lower_to_triton_for_nvidia_gpus(lowering_for_gpu, dtype, t, d, e):
    """No GPU needed: both Pallas kernels, forward and backward, lower for CUDA to Triton kernel
    calls. Without its Triton compiler params the chunk kernel went to jax's default Pallas GPU
    backend, Mosaic GPU, which cannot lower it (the iota mask's layout; [T, D] blocks beyond
    shared memory). Triton's own compilation to PTX still needs a GPU."""
    q = jax.ShapeDtypeStruct((2, t, 4, d), dtype)
    v = jax.ShapeDtypeStruct((2, t, 4, e), dtype)

    def linear(q, k, v):
        out = attention.linear_attention(q, k, v, causal=True, implementation="pallas")
        return out.astype(jnp.float32).sum()

    def softmax(q, k, v):
        out = attention.softmax_attention(q, k, v, causal=True, implementation="pallas")
        return out.astype(jnp.float32).sum()

    triton = "custom_call @__gpu$xla.gpu.triton"
    assert lowering_for_gpu(linear, q, q, v).count(triton) == 1
    assert lowering_for_gpu(jax.grad(linear, (0, 1, 2)), q, q, v).count(triton) == 2
    if d == e:  # jax's flash kernel: its backward pass has kernels of its own
        assert lowering_for_gpu(softmax, q, q, v).count(triton) == 1
        assert lowering_for_gpu(jax.grad(softmax, (0, 1, 2)), q, q, v).count(triton) >= 2


def test_identity_map_matches_reference_when_denominator_is_positive():
    # Shift the keys so every phi(q).phi(k) is clearly positive.
    q, k, v = qkv((1, 12, 1, 4), seed=2)
    q, k = jnp.abs(q) + 0.5, jnp.abs(k) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", attention.NonPositiveDenominatorWarning)
        for causal in (False, True):
            out = attention.linear_attention(q, k, v, causal=causal, feature_map="identity")
            jax.effects_barrier()
            np.testing.assert_allclose(
                out, ref_linear_np(q, k, v, causal, "identity"), rtol=1e-5, atol=1e-6
            )


@pytest.mark.parametrize("jit", [False, True])
def test_identity_map_warns_when_denominator_is_not_positive(jit):
    # One query, two keys with "weights" q.k = +2 and -3: they sum to -1.
    q = jnp.array([[[[1.0, 0.0]]]])
    k = jnp.array([[[[2.0, 0.0]], [[-3.0, 0.0]]]])
    v = jnp.array([[[[1.0]], [[0.0]]]])
    fn = lambda q, k, v: attention.linear_attention(q, k, v, feature_map="identity")  # noqa: E731
    fn = jax.jit(fn) if jit else fn
    with pytest.warns(attention.NonPositiveDenominatorWarning, match="elu"):
        out = fn(q, k, v)
        jax.effects_barrier()
    # What happens: (2 * 1 - 3 * 0) / (-1 + eps) = -2, outside the values' range [0, 1].
    np.testing.assert_allclose(out, [[[[2.0 / (-1.0 + 1e-6)]]]], rtol=1e-6)
    # An exactly zero denominator with a zero numerator falls back to 0/eps = 0, not NaN.
    with pytest.warns(attention.NonPositiveDenominatorWarning):
        zero = attention.linear_attention(q, jnp.zeros_like(k), v, feature_map="identity")
        jax.effects_barrier()
    assert np.all(np.asarray(zero) == 0.0)


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("shape", [(2, 1, 2, 16), (2, 37, 2, 16), (1, 130, 3, 32), (1, 64, 1, 48)])
def test_fused_cpu_non_causal_matches_float64_with_gradients(feature_map, shape):
    """The non-causal fused kernel (features, products and normalisation in one pass per
    side) against the explicit float64 T x T formula: values and gradients."""
    if kernels.build_error():
        pytest.skip(f"the fused CPU kernel cannot be built here: {kernels.build_error()}")
    q, k, v = qkv(shape, seed=shape[1])
    w = jax.random.normal(jax.random.key(3), v.shape)

    def loss(q, k, v):
        out = attention.linear_attention(
            q, k, v, feature_map=feature_map, implementation="fused_cpu"
        )
        return jnp.sum(out * w), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(
        out, ref_linear_np(q, k, v, False, feature_map), rtol=2e-5, atol=2e-5
    )
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (q, k, v)]
        w64 = jnp.asarray(w, jnp.float64)
        expected = jax.grad(
            lambda q, k, v: jnp.sum(explicit_linear_jnp(q, k, v, feature_map, False) * w64),
            (0, 1, 2),
        )(*args)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)
    if feature_map == "relu":  # no query feature left: eps keeps 0 / 0 out, as the formula does
        silent = -jnp.abs(q) - 0.1
        out = attention.linear_attention(
            silent, k, v, feature_map="relu", implementation="fused_cpu"
        )
        np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("pays_off", [True, False])
def test_linear_auto_takes_the_fused_kernels_only_where_they_pay(monkeypatch, pays_off):
    if kernels.build_error():
        pytest.skip(f"the fused CPU kernel cannot be built here: {kernels.build_error()}")
    # The features the kernels are built for decide (the CPU's own, or $HW2JAX_KERNEL_MARCH's).
    monkeypatch.setattr(kernels, "kernel_vector_features", lambda: {"avx512f": pays_off})
    calls = spy_on_kernels(monkeypatch, "linear_attention_cpu", "causal_linear_product_cpu")
    q, k, v = qkv((1, 20, 2, 16), seed=4)
    for causal in (False, True):
        out = attention.linear_attention(q, k, v, causal=causal)
        np.testing.assert_allclose(out, ref_linear_np(q, k, v, causal, "elu"), rtol=2e-5, atol=2e-5)
    assert calls == ["linear_attention_cpu", "causal_linear_product_cpu"] * pays_off
    calls.clear()
    positive = jnp.abs(q) + 0.5, jnp.abs(k) + 0.5, v  # (identity weights may cancel, and warn)
    attention.linear_attention(*positive, feature_map="identity")  # the kernel has no identity
    attention.linear_attention(*qkv((1, 20, 2, 8), seed=4), causal=True)  # head dim 8
    assert not calls
    with pytest.raises(ValueError, match=r"computes elu \+ 1 or relu features, not 'identity'"):
        attention.linear_attention(q, k, v, feature_map="identity", implementation="fused_cpu")


@pytest.mark.parametrize(
    "causal,method",
    [
        (False, "chunked"),
        (True, "chunked"),
        (True, "recurrent"),
        (True, "pallas"),
        (True, "fused_cpu"),  # XLA's temporaries; the kernel's own buffers are O(T) by design
    ],
)
def test_linear_attention_memory_is_linear_at_128k(causal, method):
    t, h, d = 131072, 4, 64
    spec = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
    fn = jax.jit(
        lambda q, k, v: attention.linear_attention(q, k, v, causal=causal, implementation=method)
    )
    temp = fn.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
    assert temp < 2 * 2**30, f"{temp / 2**30:.2f} GiB of temporaries"
    # A T x T score matrix alone would be 4 * 131072**2 * 4 bytes = 256 GiB.


def test_bad_inputs_give_clear_errors():
    q, k, v = qkv((1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"\[batch, T, heads, head_dim\]"):
        attention.linear_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="must match q"):
        attention.softmax_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="feature_map"):
        attention.linear_attention(q, k, v, feature_map="softplus")
    with pytest.raises(ValueError, match="causal"):
        attention.linear_attention(q, k[:, :2], v[:, :2], causal=True)
    with pytest.raises(TypeError, match="astype"):
        attention.softmax_attention(q.astype(jnp.int32), k, v)


# ------------------------------------------------------------------ weightless self-attention


def orthogonal_tokens(beta, dim=6, seed=0):
    """The assignment's example: x1 = d + b, x2 = a, x3 = c + b, for orthogonal a, b, c, d of
    norm beta (a random rotation of the standard basis, so nothing is axis-aligned)."""
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    a, b, c, d = beta * rotation[:4]
    return np.stack([d + b, a, c + b]).astype(np.float32)


@pytest.mark.parametrize("beta", [10.0, 1e2, 1e4, 1e6, 1e9])
def test_self_attention_copies_orthogonal_tokens(beta):
    x = orthogonal_tokens(beta)
    norms = np.linalg.norm(x.astype(np.float64), axis=-1)
    np.testing.assert_allclose(norms, [np.sqrt(2) * beta, beta, np.sqrt(2) * beta], rtol=1e-6)
    out = np.asarray(attention.self_attention(jnp.asarray(x)))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5 * beta)
    weights = attention.self_attention_weights(jnp.asarray(x))
    np.testing.assert_allclose(weights, np.eye(3), atol=1e-5)


def test_self_attention_at_small_beta_mixes_tokens():
    # At beta = 1 the gaps are 1, so the output is a genuine average, not a copy.
    x = orthogonal_tokens(1.0)
    out = attention.self_attention(jnp.asarray(x))
    logits = x.astype(np.float64) @ x.T.astype(np.float64)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, w @ x, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, x, atol=1e-2)


def test_self_attention_scale_and_batching():
    x = jax.random.normal(jax.random.key(7), (3, 5, 4))
    out = attention.self_attention(x, scale=0.5)
    xn = np.asarray(x, np.float64)
    logits = 0.5 * np.einsum("btd,bsd->bts", xn, xn)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("bts,bsd->btd", w, xn), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jax.jit(attention.self_attention)(x), attention.self_attention(x), rtol=1e-6
    )


def test_self_attention_overflow_is_an_error_not_nan():
    with pytest.raises(FloatingPointError, match="float64"):
        attention.self_attention(jnp.asarray(orthogonal_tokens(1e20)))


# ------------------------------------------------------------ blockwise (flash) softmax attention


@pytest.mark.parametrize(
    "t,block,causal",
    [
        (1, 512, False),
        (37, 8, True),
        (37, 8, False),
        (64, 16, True),
        (130, 64, False),
        (200, 512, True),
    ],
)
def test_blockwise_softmax_matches_reference_with_gradients(t, block, causal):
    q, k, v = qkv((2, t, 3, 8), e=5, seed=t)
    out = attention.blockwise_softmax_attention(q, k, v, causal=causal, block_size=block)
    np.testing.assert_allclose(out, ref_softmax_np(q, k, v, causal), rtol=1e-5, atol=1e-5)
    w = jax.random.normal(jax.random.key(1), out.shape)

    def loss(impl):
        return lambda q, k, v: jnp.sum(
            attention.softmax_attention(q, k, v, causal=causal, implementation=impl) * w
        )

    blockwise = functools.partial(
        attention.blockwise_softmax_attention, causal=causal, block_size=block
    )
    ours = jax.grad(lambda q, k, v: jnp.sum(blockwise(q, k, v) * w), (0, 1, 2))(q, k, v)
    ref = jax.grad(loss("naive"), (0, 1, 2))(q, k, v)
    for g_ours, g_ref in zip(ours, ref, strict=True):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_softmax_memory_is_linear_at_128k(causal):
    spec = jax.ShapeDtypeStruct((1, 131072, 4, 64), jnp.float32)
    fwd = jax.jit(lambda q, k, v: attention.blockwise_softmax_attention(q, k, v, causal=causal))
    grad = jax.jit(
        jax.grad(
            lambda q, k, v: attention.blockwise_softmax_attention(q, k, v, causal=causal).sum(),
            (0, 1, 2),
        )
    )
    for fn in (fwd, grad):
        temp = fn.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
        assert temp < 2 * 2**30, f"{temp / 2**30:.2f} GiB of temporaries"


def test_softmax_attention_dispatches_to_blockwise_at_long_t():
    spec = jax.ShapeDtypeStruct((1, 16384, 4, 64), jnp.float32)

    def lowered(impl, grad=False):
        def fn(q, k, v):
            return attention.softmax_attention(q, k, v, implementation=impl)

        if grad:
            return jax.jit(jax.grad(lambda *a: fn(*a).sum(), (0, 1, 2))).lower(spec, spec, spec)
        return jax.jit(fn).lower(spec, spec, spec)

    def temp(impl, grad=False):
        return lowered(impl, grad).compile().memory_analysis().temp_size_in_bytes

    # The naive program holds the full T x T score matrix (XLA's CPU library fusions may keep
    # it out of temp_size, so look at the program); auto and blockwise never build it. Auto's
    # forward may be the fused CPU kernel (O(T) too); its gradient is blockwise's.
    assert "16384x16384" in lowered("naive").as_text()
    for grad in (False, True):
        assert "16384x16384" not in lowered("auto", grad).as_text()
        assert temp("auto", grad) < 2**30
    # Auto's gradient is the flash kernel's where the fused kernels pay, else blockwise's; its
    # forward alone is blockwise's at this length either way (faster than the kernels').
    if "hw2jax_cpu_flash_backward" in lowered("auto", grad=True).as_text():
        assert attention.dispatch.this_machine().fused_cpu_pays_off
    else:
        assert temp("auto", grad=True) == temp("blockwise", grad=True)
    assert "hw2jax_cpu_" not in lowered("auto").as_text()


@pytest.mark.parametrize("implementation", ["auto", "parallel"])
@pytest.mark.parametrize("causal", [False, True])
def test_identity_map_warns_when_the_denominator_nearly_cancels(causal, implementation):
    # Weights +1 and -(1 - 1.2e-7): a tiny positive denominator, outputs amplified ~8e6-fold.
    q = jnp.array([[[[1.0, 0.0]], [[1.0, 0.0]]]])
    k = jnp.array([[[[1.0, 0.0]], [[-(1.0 - 1.2e-7), 0.0]]]])
    v = jnp.array([[[[1.0]], [[0.0]]]])
    with pytest.warns(attention.NonPositiveDenominatorWarning, match=r"fell to .* cancel"):
        out = attention.linear_attention(
            q, k, v, causal=causal, feature_map="identity", implementation=implementation
        )
        jax.effects_barrier()
    # The float64 formula gives the same huge value: the warning, not the arithmetic, is new.
    ref = ref_linear_np(q, k, v, causal, "identity")
    np.testing.assert_allclose(out[:, -1], ref[:, -1], rtol=0.2)
    assert float(np.max(np.abs(out))) > 1e5


def test_self_attention_names_a_nan_in_its_input():
    x = jnp.ones((3, 4)).at[1, 2].set(jnp.nan)
    with pytest.raises(
        ValueError, match=r"x holds 1 NaN or inf value\(s\), the first at index \(1, 2\)"
    ):
        attention.self_attention(x)
    big = jnp.full((2, 3), 1e20)  # finite inputs whose logits overflow keep their own message
    with pytest.raises(FloatingPointError, match="overflowed float32"):
        attention.self_attention(big)


def spy_on_kernels(monkeypatch, *names: str) -> list[str]:
    """Wraps the named functions of hw2jax.kernels; returns the list their calls append to."""
    calls = []
    for name in names:
        real = getattr(kernels, name)
        spy = lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw)  # noqa: E731
        monkeypatch.setattr(kernels, name, spy)
    return calls


SOFTMAX_PATHS = [
    (impl, causal) for impl in ("naive", "blockwise", "xla", "pallas") for causal in (False, True)
] + [("fused_cpu", False), ("fused_cpu", True)]


@pytest.mark.parametrize("impl,causal", SOFTMAX_PATHS)
def test_every_softmax_implementation_matches_the_float64_formula(impl, causal):
    """Values and gradients of each path the entry point offers on this machine (pallas in
    interpret mode off a GPU; T = 37 is not a whole number of its blocks)."""
    if impl == "fused_cpu" and kernels.build_error():
        pytest.skip(f"the fused CPU kernel cannot be built here: {kernels.build_error()}")
    q, k, v = qkv((2, 37, 2, 16), seed=11)
    out = attention.softmax_attention(q, k, v, causal=causal, implementation=impl)
    np.testing.assert_allclose(out, ref_softmax_np(q, k, v, causal), rtol=2e-5, atol=2e-5)
    w = np.asarray(jax.random.normal(jax.random.key(2), out.shape), np.float64)

    def loss64(q, k, v):  # the float64 formula again, differentiated by jax in float64
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        if causal:
            logits = jnp.where(jnp.tril(jnp.ones((37, 37), bool)), logits, -jnp.inf)
        return jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v) * w)

    with jax.enable_x64(True):
        ref = jax.grad(loss64, (0, 1, 2))(*(jnp.asarray(a, jnp.float64) for a in (q, k, v)))
    ours = jax.grad(
        lambda q, k, v: jnp.sum(
            attention.softmax_attention(q, k, v, causal=causal, implementation=impl)
            * jnp.asarray(w, jnp.float32)
        ),
        (0, 1, 2),
    )(q, k, v)
    for g_ours, g_ref in zip(ours, ref, strict=True):
        np.testing.assert_allclose(g_ours, np.asarray(g_ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pays_off", [True, False])
def test_auto_runs_the_fused_cpu_kernels_only_where_they_pay(monkeypatch, pays_off):
    """With the kernels' features faked both ways: with AVX-512 the kernels compute every forward
    pass, and gradients from T = 256 on (below, naive's); without, they never run."""
    if kernels.build_error():
        pytest.skip(f"the fused CPU kernel cannot be built here: {kernels.build_error()}")
    # The features the kernels are built for decide (the CPU's own, or $HW2JAX_KERNEL_MARCH's).
    monkeypatch.setattr(kernels, "kernel_vector_features", lambda: {"avx512f": pays_off})
    calls = spy_on_kernels(monkeypatch, "cpu_attention", "cpu_flash_attention")
    q, k, v = qkv((2, 40, 4, 32), seed=5)
    for causal, kernel in ((False, "cpu_attention"), (True, "cpu_flash_attention")):
        out = attention.softmax_attention(q, k, v, causal=causal)
        assert calls == [kernel] * pays_off
        np.testing.assert_allclose(out, ref_softmax_np(q, k, v, causal), rtol=2e-5, atol=2e-5)
        calls.clear()
    grads = jax.grad(lambda q, k, v: attention.softmax_attention(q, k, v).sum(), (0, 1, 2))
    naive = jax.grad(
        lambda q, k, v: attention.softmax_attention(q, k, v, implementation="naive").sum(),
        (0, 1, 2),
    )
    for got, want in zip(grads(q, k, v), naive(q, k, v), strict=True):
        np.testing.assert_array_equal(got, want)
    assert not calls
    long = qkv((1, 256, 1, 16), seed=6)
    jax.grad(lambda *a: attention.softmax_attention(*a, causal=True).sum())(*long)
    assert calls == ["cpu_flash_attention"] * pays_off
    calls.clear()
    attention.softmax_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)))  # not float32
    assert not calls
    with pytest.raises(ValueError, match="fused_cpu' cannot run: the fused kernel computes in"):
        attention.softmax_attention(
            *(a.astype(jnp.bfloat16) for a in (q, k, v)), implementation="fused_cpu"
        )


def test_cudnn_needs_an_nvidia_gpu_and_says_so():
    q, k, v = qkv((1, 8, 1, 16), seed=1)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="cudnn' cannot run: cuDNN needs an NVIDIA GPU"):
            attention.softmax_attention(q, k, v, implementation="cudnn")
        with pytest.raises(ValueError, match="use one of auto, jax, xla, cudnn, pallas"):
            attention.softmax_attention(q, k, v, implementation="flash")
        pytest.skip("cuDNN's values and gradients are checked on an NVIDIA GPU only")
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    out = attention.softmax_attention(q, k, v, implementation="cudnn")
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_softmax_np(q, k, v), atol=2e-2)


def test_identity_cancellation_check_handles_several_heads():
    # Non-causal, 3 heads and 5 steps: the check's norms must sum over time, not heads.
    q, k, v = qkv((2, 5, 3, 4), seed=6)
    q, k = jnp.abs(q) + 0.5, jnp.abs(k) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", attention.NonPositiveDenominatorWarning)
        out = attention.linear_attention(q, k, v, feature_map="identity")
        jax.effects_barrier()
    np.testing.assert_allclose(out, ref_linear_np(q, k, v, False, "identity"), rtol=1e-5, atol=1e-6)


Q = jnp.ones((1, 5, 2, 4))
BAD_CALLS = {
    "key_bias of another shape": (
        lambda: attention.key_bias_attention(Q, Q, Q, jnp.ones((3,))),
        r"key_bias must be \[batch, T_k\] = \(1, 5\), one value per key, got shape \(3,\)",
    ),
    "attention dropout without seeds": (
        lambda: attention.key_bias_attention(Q, Q, Q, dropout_rate=0.1),
        r"attention dropout needs seeds, uint32 \[batch, heads\]: "
        r"hw2jax.kernels.dropout.seeds\(rng, batch, heads\)",
    ),
    "dropout seeds of another shape": (
        lambda: attention.key_bias_attention(
            Q, Q, Q, dropout_rate=0.1, dropout_seeds=jnp.zeros((1, 3), jnp.uint32)
        ),
        r"dropout seeds must be \[batch, heads\] = \(1, 2\), got \(1, 3\)",
    ),
    "dropout over more scores than its counter holds": (
        lambda: attention.key_bias_attention(
            *(jnp.zeros((1, 65_537, 1, 16)),) * 3,
            dropout_rate=0.1,
            dropout_seeds=jnp.zeros((1, 1), jnp.uint32),
        ),
        r"attention dropout over 65,537 x 65,537 scores: its counter i \* T_k \+ j passes 2\^32",
    ),
    "a dropout rate of 1": (
        lambda: attention.key_bias_attention(Q, Q, Q, dropout_rate=1.0),
        r"dropout rate must be in \[0, 1\), got 1.0",
    ),
    "key_bias_attention on 2-D arrays": (
        lambda: attention.key_bias_attention(jnp.ones((5, 4)), Q, Q),
        r"q must be \[batch, T, heads, head_dim\], got shape \(5, 4\)",
    ),
    "matmul_f32 of mismatched dims": (
        lambda: attention.matmul_f32(jnp.ones((3, 4)), jnp.ones((5, 2))),
        r"the contracted dims differ \(4 in a \(3, 4\), 5 in b \(5, 2\)",
    ),
    "matmul_f32 of a vector": (
        lambda: attention.matmul_f32(jnp.ones((4,)), jnp.ones((4, 2))),
        r"same rank >= 2 with equal leading \(batch\) dims, got \(4,\) and \(4, 2\)",
    ),
    "matmul_f32 of a matrix and a vector": (
        lambda: attention.matmul_f32(jnp.ones((3, 4)), jnp.ones((4,))),
        r"same rank >= 2 with equal leading \(batch\) dims, got \(3, 4\) and \(4,\)",
    ),
    "matmul_f32 of unequal batches": (
        lambda: attention.matmul_f32(jnp.ones((2, 3, 4)), jnp.ones((3, 4, 5))),
        r"equal leading \(batch\) dims, got \(2, 3, 4\) and \(3, 4, 5\)",
    ),
    "matmul_f32 of mismatched dims, a transposed": (
        lambda: attention.matmul_f32(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)), transpose_a=True),
        r"\(3 in a \(2, 3, 4\), 4 in b \(2, 4, 5\), transpose_a=True, transpose_b=False\)",
    ),
    "performer with no features": (
        lambda: attention.performer_attention(Q, Q, Q, num_features=0, key=jax.random.key(0)),
        r"num_features must be a positive int, got 0",
    ),
    "performer with a seed for a key": (
        lambda: attention.performer_attention(Q, Q, Q, num_features=8, key=3),
        r"key must be a jax PRNG key, got int; pass jax.random.key\(seed\)",
    ),
    "performer_features of a vector": (
        lambda: attention.performer_features(jnp.ones((3,)), jnp.ones((8, 4)), is_query=True),
        r"x needs at least 4 dims, got shape \(3,\)",
    ),
    "performer_features of another head_dim": (
        lambda: attention.performer_features(Q, jnp.ones((8, 3)), is_query=True),
        r"projection \[num_features, head_dim\], got \(1, 5, 2, 4\) and \(8, 3\)",
    ),
    "retention_decays of 0 heads": (
        lambda: attention.retention_decays(0),
        r"heads must be a positive int, got 0",
    ),
    "retention_decays of 2.5 heads": (
        lambda: attention.retention_decays(2.5),
        r"heads must be a positive int, got 2.5",
    ),
    "gla with a decay above 1": (
        lambda: attention.gated_linear_attention(Q, Q, Q, jnp.ones((1, 5, 2, 4))),
        r"log_alpha must be <= 0 \(decays exp\(log_alpha\) in \(0, 1\]\), got a maximum of 1",
    ),
    "the recurrence of a string": (
        lambda: recurrence.run("abc"),
        r"x must be an array of real numbers \[..., T\], got str 'abc'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_public_functions_refuse_bad_values_up_front(case):
    """Each is the project's own error (a ValueError or TypeError) with one line naming the
    value, raised before any jax computation, not an IndexError or a dot_general message."""
    call, message = BAD_CALLS[case]
    with pytest.raises(Hw2jaxError, match=message) as error:
        call()
    assert "\n" not in str(error.value)
    assert isinstance(error.value, (ValueError, TypeError))


def test_legacy_prng_keys_still_draw_performer_features():
    a = attention.performer_projection(jax.random.PRNGKey(0), 8, 4)
    b = attention.performer_projection(jax.random.wrap_key_data(jax.random.PRNGKey(0)), 8, 4)
    np.testing.assert_array_equal(a, b)
