"""The fused CPU attention kernel against independent references: the explicit float64 NumPy
O(T^2) formula of test_attention for the forward, torch's scaled_dot_product_attention for the
gradients."""

import functools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fresh_process_env, run_on_host_devices
from test_attention import explicit_linear_jnp, ref_softmax_np, ref_softmax_weights_np

from hw2jax import attention, cpu, kernels
from hw2jax.kernels import build
from hw2jax.models import bert

MASKED = np.finfo(np.float32).min


def _inputs(shape, seed=0, masked_fraction=0.3):
    rng = np.random.default_rng(seed)
    q, k, v = (3 * rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    keep = rng.random(shape[:2]) > masked_fraction
    keep[:, 0] = True
    bias = rng.standard_normal(shape[:2])  # the keys kept are biased too: any values, not 0
    return q, k, v, np.where(keep, bias, MASKED).astype(np.float32)


# T around the kernel's blocks (8 query rows, keys in 64s), every head size it is compiled for.
@pytest.mark.parametrize(
    "shape",
    [
        (2, 1, 1, 16),
        (3, 7, 2, 32),
        (2, 33, 3, 48),
        (1, 64, 2, 64),
        (2, 100, 1, 80),
        (1, 31, 2, 96),
        (1, 9, 1, 112),
        (2, 257, 2, 128),
    ],
)
def test_forward_matches_explicit_formula(shape):
    q, k, v, key_bias = _inputs(shape)
    scale = 0.7 / np.sqrt(shape[-1])
    got = jax.jit(kernels.cpu_attention, static_argnames="scale")(q, k, v, key_bias, scale=scale)
    # Scores here spread over +-20; float32 rounding of them moves outputs by up to ~3e-5 (XLA's
    # own attention: ~1e-5; the kernel sums the head dim in one chain, XLA in blocks).
    expected = ref_softmax_np(q, k, v, key_bias=key_bias, scale=scale)
    np.testing.assert_allclose(got, expected, atol=6e-5, rtol=1e-5)


def test_defaults_no_mask_and_fully_masked_rows():
    q, k, v, _ = _inputs((2, 40, 2, 32), seed=1)
    expected = ref_softmax_np(q, k, v)
    np.testing.assert_allclose(kernels.cpu_attention(q, k, v), expected, atol=2e-5, rtol=1e-5)
    # Every key masked (Hugging Face's finfo.min): uniform weights, the mean of v, as in torch.
    all_masked = np.full((2, 40), MASKED, np.float32)
    got = kernels.cpu_attention(q, k, v, all_masked)
    np.testing.assert_allclose(got, np.broadcast_to(v.mean(1, keepdims=True), v.shape), atol=1e-5)


def test_large_scores_stay_finite():
    q, k, v, key_bias = _inputs((1, 50, 1, 16), seed=2)
    got = kernels.cpu_attention(30 * q, 30 * k, v, key_bias)  # scores in the thousands
    np.testing.assert_allclose(got, ref_softmax_np(30 * q, 30 * k, v, key_bias=key_bias), atol=2e-5)


def test_gradients_match_torch_sdpa():
    torch = pytest.importorskip("torch")
    q, k, v, key_bias = _inputs((2, 21, 2, 32), seed=3)
    cotangent = np.random.default_rng(4).standard_normal(q.shape).astype(np.float32)

    # The flash kernels with a key bias, as BERT's fine-tuning runs them.
    def loss(q, k, v):
        scale = 1.0 / np.sqrt(q.shape[-1])
        out = attention.key_bias_attention(
            q, k, v, key_bias, scale=scale, implementation="fused_cpu"
        )
        return jnp.sum(out * cotangent)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    tq, tk, tv = (torch.tensor(a.transpose(0, 2, 1, 3), requires_grad=True) for a in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=torch.tensor(key_bias[:, None, None, :])
    )
    (out * torch.tensor(cotangent.transpose(0, 2, 1, 3))).sum().backward()
    for got, ref in zip(grads, (tq, tk, tv), strict=True):
        expected = ref.grad.numpy().transpose(0, 2, 1, 3)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def _softmax_gradients_np(q, k, v, cotangent, causal, scale, key_bias=None, keep=None, rate=0.0):
    """The closed-form gradients of sum(cotangent * dropout(softmax(scale q k^T + key_bias)) v),
    in float64: dropout multiplies probability (b, h, i, j) by keep[b, h, i, j] / (1 - rate).
    Returns dq, dk, dv and the key bias's gradient [B, T]."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, cotangent))
    p = ref_softmax_weights_np(q, k, causal, key_bias, scale)
    factor = 1.0 if keep is None else keep / (1.0 - np.float64(np.float32(rate)))
    dp = np.einsum("bqhd,bkhd->bhqk", g, v) * factor
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dv = np.einsum("bhqk,bqhd->bkhd", p * factor, g)
    return dq, dk, dv, ds.sum((1, 2))


def _keep_mask_np(seeds, t, rate):
    """Dropout's keep mask [B, H, T, T] from the hash in hw2jax.kernels.dropout's docstring,
    written again in NumPy uint32 arithmetic."""

    def mix(x):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))

    s = np.asarray(seeds, np.uint32)[:, :, None, None]
    counters = (np.arange(t, dtype=np.uint64)[:, None] * t + np.arange(t)).astype(np.uint32)
    bits = mix(mix(counters ^ mix(s ^ np.uint32(0x9E3779B9))) ^ s)
    return bits >= np.uint32(round(float(np.float32(rate)) * 2**32))


# T around the flash kernel's 64 x 64 blocks and its passes of 8 blocks (600: a second, partial
# pass), head sizes from its compiled range.
@pytest.mark.parametrize(
    "shape",
    [
        (2, 1, 1, 16),
        (2, 37, 3, 64),
        (1, 64, 2, 32),
        (1, 65, 1, 48),
        (2, 130, 2, 128),
        (1, 200, 1, 64),
        (1, 600, 1, 16),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_kernel_matches_float64_with_gradients(shape, causal):
    q, k, v, _ = _inputs(shape, seed=shape[1])
    scale = 0.7 / np.sqrt(shape[-1])
    cotangent = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    out, pullback = jax.vjp(
        lambda q, k, v: kernels.cpu_flash_attention(q, k, v, causal=causal, scale=scale), q, k, v
    )
    expected = ref_softmax_np(q, k, v, causal=causal, scale=scale)
    np.testing.assert_allclose(out, expected, atol=6e-5, rtol=1e-5)
    grads = pullback(jnp.asarray(cotangent))
    refs = _softmax_gradients_np(q, k, v, cotangent, causal, scale)[:3]
    for name, got, ref in zip("qkv", grads, refs, strict=True):
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4, err_msg=f"d{name}")


# Blocks cut by T, a masked key block (keys 64-127 of the 130), both head-dim tilings.
@pytest.mark.parametrize("shape", [(2, 37, 3, 64), (1, 130, 2, 32), (1, 200, 1, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_kernel_with_key_bias_and_dropout_matches_float64(shape, causal):
    """BERT's fine-tuning attention: a padding bias and dropout from the hash, forward and every
    gradient (the bias's too) against the float64 closed form with the mask rebuilt in NumPy."""
    q, k, v, key_bias = _inputs(shape, seed=shape[1] + 1)
    if shape[1] == 130:
        key_bias[:, 64:128] = MASKED
    scale, rate = 0.7 / np.sqrt(shape[-1]), 0.25
    seeds = np.random.default_rng(3).integers(0, 2**32, shape[:1] + shape[2:3], dtype=np.uint32)
    cotangent = np.random.default_rng(9).standard_normal(shape).astype(np.float32)

    def attend(q, k, v, key_bias):
        return kernels.cpu_flash_attention(
            q, k, v, key_bias, causal=causal, scale=scale, dropout_rate=rate, dropout_seeds=seeds
        )

    out, pullback = jax.vjp(attend, q, k, v, key_bias)
    keep = _keep_mask_np(seeds, shape[1], rate)
    assert 0.6 < keep.mean() < 0.9
    want = _dropout_attention_np(q, k, v, key_bias, keep, rate, causal, scale)
    np.testing.assert_allclose(out, want, atol=6e-5, rtol=1e-5)
    grads = pullback(jnp.asarray(cotangent))
    refs = _softmax_gradients_np(q, k, v, cotangent, causal, scale, key_bias, keep, rate)
    for name, got, ref in zip(("q", "k", "v", "key_bias"), grads, refs, strict=True):
        np.testing.assert_allclose(got, ref, atol=3e-4, rtol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("shape", [(2, 37, 3, 64), (1, 130, 2, 16), (1, 600, 1, 32)])
def test_a_key_bias_of_any_values_is_added_to_the_scores(shape):
    """Not only a mask's 0 and finfo.min: biases drawn from N(0, 4), one key masked, in the
    flash kernels (values and the four gradients, the bias's included) and the row kernel."""
    rng = np.random.default_rng(shape[1])
    q, k, v, g = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
    key_bias = (2 * rng.standard_normal(shape[:2])).astype(np.float32)
    key_bias[:, 3] = MASKED
    scale = 0.7 / np.sqrt(shape[-1])
    for causal in (False, True):
        attend = functools.partial(kernels.cpu_flash_attention, causal=causal, scale=scale)
        out, pullback = jax.vjp(attend, q, k, v, key_bias)
        want = ref_softmax_np(q, k, v, causal=causal, key_bias=key_bias, scale=scale)
        np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
        refs = _softmax_gradients_np(q, k, v, g, causal, scale, key_bias)
        for name, got, ref in zip(("q", "k", "v", "key_bias"), pullback(g), refs, strict=True):
            np.testing.assert_allclose(got, ref, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")
    row = kernels.cpu_attention(q, k, v, key_bias, scale=scale)
    want = ref_softmax_np(q, k, v, key_bias=key_bias, scale=scale)
    np.testing.assert_allclose(row, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["xla", "fused_cpu"])
@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_key_bias_attention_matches_float64_on_every_path(implementation, rate):
    """BERT's attention as its layers call it, on XLA's form and the kernels, with a key bias
    of any values and dropout or none: values and the four gradients (the bias's too) against
    the float64 closed form with the dropout mask rebuilt in NumPy."""
    shape = (2, 37, 3, 32)
    rng = np.random.default_rng(11)
    q, k, v, g = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
    key_bias = (2 * rng.standard_normal(shape[:2])).astype(np.float32)
    key_bias[:, 5] = MASKED
    seeds = rng.integers(0, 2**32, (shape[0], shape[2]), dtype=np.uint32)
    scale = 0.7 / np.sqrt(shape[-1])

    def attend(q, k, v, key_bias):
        return attention.key_bias_attention(
            q,
            k,
            v,
            key_bias,
            scale=scale,
            dropout_rate=rate,
            dropout_seeds=seeds if rate else None,
            implementation=implementation,
        )

    out, pullback = jax.vjp(attend, q, k, v, key_bias)
    keep = _keep_mask_np(seeds, shape[1], rate)  # at rate 0: every entry kept
    want = _dropout_attention_np(q, k, v, key_bias, keep, rate, False, scale)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
    refs = _softmax_gradients_np(q, k, v, g, False, scale, key_bias, keep, rate)
    for name, got, ref in zip(("q", "k", "v", "key_bias"), pullback(g), refs, strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


def test_flash_kernel_takes_minus_infinity_for_whole_key_blocks():
    """-inf biases on the first 70 keys (more than a 64-key block, as left padding gives):
    the rows' running maximum stays defined, and the output and gradients are those of the
    keys left."""
    q, k, v, _ = _inputs((1, 130, 2, 16), seed=4)
    key_bias = np.where(np.arange(130) < 70, -np.inf, 0.0).astype(np.float32)[None]
    out, pullback = jax.vjp(lambda q, k, v: kernels.cpu_flash_attention(q, k, v, key_bias), q, k, v)
    kept = slice(70, None)
    want = ref_softmax_np(q, k[:, kept], v[:, kept])
    np.testing.assert_allclose(out, want, atol=6e-5, rtol=1e-5)
    cotangent = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    dq, dk, dv = pullback(jnp.asarray(cotangent))
    scale = 1.0 / np.sqrt(16)
    ref = _softmax_gradients_np(
        q, k, v, cotangent, False, scale, np.where(np.isinf(key_bias), -1e30, 0.0)
    )
    for name, got, expected in zip("qkv", (dq, dk, dv), ref[:3], strict=True):
        np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4, err_msg=f"d{name}")
    assert np.all(np.asarray(dk)[:, :70] == 0) and np.all(np.asarray(dv)[:, :70] == 0)


def _dropout_attention_np(q, k, v, key_bias, keep, rate, causal, scale):
    """float64: dropout(softmax(scale q k^T + key_bias)) v, [B, T, H, D]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale + np.float64(key_bias)[:, None, None, :]
    if causal:
        t = q.shape[1]
        logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True) * keep / (1.0 - np.float64(np.float32(rate)))
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_dropout_masks_are_fair_and_independent():
    """The hash keeps 1 - rate of the entries, with no pattern over rows, keys or heads: its
    shares stay within 5 standard deviations of binomial counts, and two heads' masks agree only
    as two independent draws do."""
    rate, t = 0.1, 256
    seeds = np.random.default_rng(0).integers(0, 2**32, (4, 6), dtype=np.uint32)
    keep = np.asarray(kernels.dropout.keep_mask(jnp.asarray(seeds), t, t, rate))
    np.testing.assert_array_equal(keep, _keep_mask_np(seeds, t, rate))
    p = 1 - rate

    def within(share, n):
        assert np.all(np.abs(share - p) < 5 * np.sqrt(p * (1 - p) / n)), share

    within(keep.mean(), keep.size)
    within(keep.mean((0, 1, 3)), keep.size // t)  # each query row
    within(keep.mean((0, 1, 2)), keep.size // t)  # each key
    within(keep.mean((2, 3)), t * t)  # each (sequence, head)
    agree = (keep[:, 0] == keep[:, 1]).mean()
    q2 = p * p + (1 - p) ** 2
    assert abs(agree - q2) < 5 * np.sqrt(q2 * (1 - q2) / (4 * t * t))
    assert abs((keep[..., 1:] == keep[..., :-1]).mean() - q2) < 0.01  # neighbouring keys


def test_flash_kernel_under_vmap_and_with_large_scores():
    q, k, v, _ = _inputs((2, 70, 2, 16), seed=6)
    stacked = lambda a: np.stack([a, a[::-1]])  # noqa: E731
    got = jax.vmap(functools.partial(kernels.cpu_flash_attention, causal=True))(
        stacked(q), stacked(k), stacked(v)
    )
    expected = ref_softmax_np(q[::-1], k[::-1], v[::-1], causal=True)
    np.testing.assert_allclose(got[1], expected, atol=2e-5, rtol=1e-5)
    big = kernels.cpu_flash_attention(30 * q, 30 * k, v)  # scores in the thousands
    # Scores of ~1e3 carry float32 rounding of ~6e-5: the outputs' tolerance follows.
    np.testing.assert_allclose(big, ref_softmax_np(30 * q, 30 * k, v), atol=6e-5, rtol=1e-5)


def test_vmap_folds_into_the_batch():
    q, k, v, key_bias = _inputs((2, 12, 2, 16), seed=5)
    stacked = lambda a: np.stack([a, a[::-1]])  # noqa: E731
    got = jax.vmap(kernels.cpu_attention, in_axes=(0, 0, None, 0))(
        stacked(q), stacked(k), v, stacked(key_bias)
    )
    expected = ref_softmax_np(q[::-1], k[::-1], v, key_bias=key_bias[::-1])
    np.testing.assert_allclose(got[1], expected, atol=2e-5, rtol=1e-5)


_SHARDED = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from hw2jax import kernels
assert jax.device_count() == 2
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((4, 24, 4, 16)).astype(np.float32) for _ in range(3))
key_bias = np.where(rng.random((4, 24)) > 0.3, 0.0, -1e30).astype(np.float32)
mesh = Mesh(np.array(jax.devices()).reshape(1, 2), ("data", "model"))
f = jax.jit(lambda *a: kernels.cpu_attention(*a) + 0.0)
for spec in (P("data", None, "model", None), P("model", None, None, None)):
    qkv = NamedSharding(mesh, spec)
    args = [jax.device_put(a, qkv) for a in (q, k, v)]
    args.append(jax.device_put(key_bias, NamedSharding(mesh, P(spec[0], None))))
    hlo = f.lower(*args).compile().as_text()
    call = next(line for line in hlo.splitlines() if '"hw2jax_cpu_attention"' in line)
    print(spec, "all-gather" in hlo, call.split("=")[1].split("custom-call")[0].strip())
    one_device = np.asarray(kernels.cpu_attention(q, k, v, key_bias))
    print(float(np.abs(np.asarray(f(*args)) - one_device).max()))
"""


_SHARDED_GRADIENTS = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from hw2jax import kernels
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((4, 70, 4, 16)).astype(np.float32) for _ in range(3))
mesh = Mesh(np.array(jax.devices()).reshape(1, 2), ("data", "model"))
bias = np.where(rng.random((4, 70)) < 0.2, np.finfo(np.float32).min, 0.0).astype(np.float32)
seeds = rng.integers(0, 2**32, (4, 4), dtype=np.uint32)
ops = {
    "flash": lambda q, k, v: kernels.cpu_flash_attention(q, k, v, causal=True),
    "flash_dropout": lambda q, k, v: kernels.cpu_flash_attention(
        q, k, v, bias, dropout_rate=0.2, dropout_seeds=seeds
    ),
    "linear": lambda q, k, v: kernels.causal_linear_product_cpu(jnp.abs(q), jnp.abs(k), v)[0],
    "dense": lambda q, k, v: kernels.linear_attention_cpu(q, k, v),
}
for name, op in ops.items():
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(op(q, k, v) ** 2), (0, 1, 2)))
    one_device = f(q, k, v)
    for spec in (P("data", None, "model", None), P("model", None, None, None)):
        args = [jax.device_put(a, NamedSharding(mesh, spec)) for a in (q, k, v)]
        hlo = f.lower(*args).compile().as_text()
        calls = [line.split("=")[1].split("custom-call")[0].strip()
                 for line in hlo.splitlines() if '"hw2jax_cpu_' in line and "custom-call(" in line]
        error = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(f(*args), one_device))
        print(name, "all-gather" in hlo, sorted(set(calls))[0].replace(" ", ""), error)
"""


def test_sharded_gradients_stay_sharded():
    """The flash and both linear kernels' forward and backward calls under a mesh: each device
    runs them on its slice (half the heads, or half the sequences), with no all-gather, and
    the gradients equal the one-device ones; with dropout too, since each (sequence, head)
    carries its own seed, so a device draws the mask one device would."""
    stdout = run_on_host_devices(_SHARDED_GRADIENTS)
    lines = [line.split() for line in stdout.splitlines()]
    assert len(lines) == 8, stdout
    for (name, gathered, shape, error), sliced in zip(lines, ["4,70,2", "2,70,4"] * 4, strict=True):
        assert gathered == "False", (name, stdout)
        assert shape.startswith(f"(f32[{sliced},16]"), (name, shape)
        assert float(error) < 1e-5, (name, error)


def test_sharded_inputs_stay_sharded():
    """Heads or sequences split over devices: each device runs the kernel on its own slice,
    with no all-gather, and the result equals the one-device call."""
    lines = run_on_host_devices(_SHARDED).splitlines()
    assert lines[0].endswith("False f32[4,24,2,16]{3,2,1,0}"), lines  # heads split in two
    assert lines[2].endswith("False f32[2,24,4,16]{3,2,1,0}"), lines  # sequences split in two
    assert float(lines[1]) < 1e-6 and float(lines[3]) < 1e-6, lines


def test_projection_biases_are_added_as_the_row_kernel_reads_q_k_v():
    """Against float64 on q + q_bias, ..., the same floats as XLA's sums before the kernel, and
    key_bias_attention's every path (and gradient) as with the sums."""
    shape = (2, 70, 3, 32)
    q, k, v, key_bias = _inputs(shape, seed=5)
    rng = np.random.default_rng(6)
    biases = tuple(rng.standard_normal(shape[-2:]).astype(np.float32) for _ in range(3))
    summed = [a + b for a, b in zip((q, k, v), biases, strict=True)]
    got = jax.jit(functools.partial(kernels.cpu_attention, scale=0.2))(
        q, k, v, key_bias, qkv_biases=biases
    )
    expected = ref_softmax_np(*(a.astype(np.float64) for a in summed), key_bias=key_bias, scale=0.2)
    np.testing.assert_allclose(got, expected, atol=6e-5, rtol=1e-5)
    sums_first = jax.jit(lambda *a: kernels.cpu_attention(*a, scale=0.2))
    np.testing.assert_array_equal(
        got, sums_first(*(jnp.add(a, b) for a, b in zip((q, k, v), biases, strict=True)), key_bias)
    )

    def loss(implementation, q, k, v, biases):
        out = attention.key_bias_attention(
            q, k, v, key_bias, qkv_biases=biases, scale=0.2, implementation=implementation
        )
        return jnp.sum(out * weights), out

    weights = rng.standard_normal(shape).astype(np.float32)
    for implementation in ("fused_cpu", "xla"):
        out = loss(implementation, q, k, v, biases)[1]
        np.testing.assert_allclose(out, expected, atol=6e-5, rtol=1e-5)
        grads, _ = jax.grad(functools.partial(loss, implementation), (0, 1, 2, 3), has_aux=True)(
            q, k, v, biases
        )
        with_sums = jax.grad(
            lambda q, k, v, b, i=implementation: loss(i, q + b[0], k + b[1], v + b[2], None)[0],
            (0, 1, 2, 3),
        )(q, k, v, biases)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(with_sums), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"three float32 \[heads, D\] = \(3, 32\) arrays"):
        kernels.cpu_attention(q, k, v, qkv_biases=(biases[0][:2], *biases[1:]))
    with pytest.raises(ValueError, match=r"\[heads, D\] = \(3, 32\) each; got"):
        attention.key_bias_attention(q, k, v, qkv_biases=biases[:2])


def test_bad_inputs_get_clear_errors():
    q, k, v, key_bias = _inputs((1, 8, 1, 16))
    with pytest.raises(ValueError, match=r"one shape \[batch, T, heads, head_dim\]"):
        kernels.cpu_attention(q, k[:, :4], v)
    with pytest.raises(ValueError, match=r"key_bias must be \[batch, T\]"):
        kernels.cpu_attention(q, k, v, key_bias[:, :4])
    with pytest.raises(ValueError, match="not a boolean mask"):
        kernels.cpu_attention(q, k, v, key_bias == 0)
    empty = np.zeros((2, 0, 1, 16), np.float32)  # no positions: an empty result, no crash
    assert kernels.cpu_attention(empty, empty, empty).shape == (2, 0, 1, 16)
    with pytest.raises(kernels.KernelUnavailable, match="head dim 24"):
        kernels.cpu_attention(*(a[..., :8].repeat(3, -1) for a in (q, k, v)))
    with pytest.raises(kernels.KernelUnavailable, match="float32, not bfloat16"):
        kernels.cpu_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    # The flash kernels check dropout's arguments as key_bias_attention does, before tracing.
    with pytest.raises(ValueError, match=r"attention dropout needs seeds"):
        kernels.cpu_flash_attention(q, k, v, dropout_rate=0.1)
    with pytest.raises(ValueError, match=r"dropout seeds must be \[batch, heads\] = \(1, 1\)"):
        kernels.cpu_flash_attention(
            q, k, v, dropout_rate=0.1, dropout_seeds=jnp.zeros((1, 2), "uint32")
        )
    with pytest.raises(ValueError, match=r"dropout seeds must be uint32"):
        kernels.cpu_flash_attention(q, k, v, dropout_rate=0.1, dropout_seeds=jnp.zeros((1, 1)))
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\), got -0.5"):
        kernels.cpu_flash_attention(q, k, v, dropout_rate=-0.5)


def test_build_failures_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HW2JAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(
        kernels.KernelUnavailable, match=r"(?s)with false failed.*implementation='xla'"
    ):
        kernels.library_path.__wrapped__()
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left behind
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(kernels.KernelUnavailable, match=r"(?s)no C.. compiler.*apt-get install g"):
        kernels.library_path.__wrapped__()


_FAKE_COMPILER = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls"
out=""; last=""
for arg in "$@"; do [ "$last" = "-o" ] && out="$arg"; last="$arg"; done
if [ "$1" = "-shared" ]; then
  for arg in "$@"; do case "$arg" in *.o) ! grep -q damaged "$arg" || exit 1;; esac; done
fi
[ -z "$out" ] || echo "object of $*" > "$out"
"""


def _fake_build(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A copy of the sources and the fake compiler, a cache in tmp_path/cache: returns the
    sources' folder and the compiler (which logs its calls beside itself)."""
    native = tmp_path / "native"
    shutil.copytree(build.NATIVE_DIR, native)
    compiler = tmp_path / "bin" / "c++"
    compiler.parent.mkdir()
    compiler.write_text(_FAKE_COMPILER)
    compiler.chmod(0o755)
    monkeypatch.setattr(build, "NATIVE_DIR", native)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("HW2JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    return native, compiler


def test_a_changed_source_compiles_that_file_alone(tmp_path, monkeypatch):
    """Objects are cached by their own inputs: a changed .cc compiles alone, a changed header
    compiles all, and a damaged cached object is compiled again when the link fails."""
    native, compiler = _fake_build(tmp_path, monkeypatch)
    calls = compiler.with_name("calls")

    def build_and_list_compiled() -> tuple[list[str], int]:
        """The sources compiled, and how many links it took."""
        calls.write_text("")
        assert kernels.library_path.__wrapped__().read_text().startswith("object of -shared")
        lines = calls.read_text().splitlines()
        compiled = [Path(line.split(" -c ")[1].split()[0]).name for line in lines if " -c " in line]
        return sorted(compiled), sum(line.startswith("-shared") for line in lines)

    sources = sorted(path.name for path in native.glob("*.cc"))
    assert len(sources) >= 6 and build_and_list_compiled() == (sources, 1)
    with (native / "gru.cc").open("a") as f:
        f.write("// changed\n")
    assert build_and_list_compiled() == (["gru.cc"], 1)
    with (native / "common.h").open("a") as f:
        f.write("// changed\n")
    assert build_and_list_compiled() == (sources, 1)
    for stale_or_current in (tmp_path / "cache" / "objects").glob("rows-*.o"):
        stale_or_current.write_text("damaged")
    with (native / "gru.cc").open("a") as f:
        f.write("// changed again\n")
    assert build_and_list_compiled() == (sources, 2)  # gru.cc, a failed link, then the rest


def test_a_build_says_it_is_building_and_when_it_is_done(tmp_path, monkeypatch, capsys):
    """A first run would otherwise sit still for the build's tens of seconds; a built library
    is loaded without a word."""
    _fake_build(tmp_path, monkeypatch)
    kernels.library_path.__wrapped__()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (
        f"hw2jax: building the C++ kernels for this CPU into {tmp_path / 'cache'} (once per CPU, "
        "compiler and jax; tens of seconds)"
    )
    assert len(lines) == 2 and re.fullmatch(r"hw2jax: kernels built in \d+ s", lines[1])
    kernels.library_path.__wrapped__()
    assert capsys.readouterr().err == ""


def test_a_build_drops_what_no_process_used_for_a_month(tmp_path, monkeypatch):
    """Cached libraries and objects untouched for CACHE_KEEP_DAYS go at the next build, with
    the dispatch timings of libraries gone; a library loaded since, the objects just linked
    and recent files stay."""
    native, _ = _fake_build(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    first = kernels.library_path.__wrapped__()
    stale, recent = "0123456789abcdef", "fedcba9876543210"
    for name in (f"cpu_attention-{stale}.so", f"cpu_attention-{recent}.so", "objects/gru-old.o"):
        (cache / name).write_text("built before")
    for name in (f"dispatch-{stale}-2-cores.json", f"dispatch-{recent}-2-cores.json"):
        (cache / name).write_text("{}")
    (cache / f"dispatch-{recent}.json").write_text("{}")  # the name before core counts
    month_ago = time.time() - (build.CACHE_KEEP_DAYS + 1) * 86400
    for path in [first, cache / f"cpu_attention-{stale}.so", *cache.glob("objects/*.o")]:
        os.utime(path, (month_ago, month_ago))
    assert kernels.library_path.__wrapped__() == first  # loaded: in use again
    first_gru = next(cache.glob("objects/gru-" + "?" * 16 + ".o"))
    with (native / "gru.cc").open("a") as f:
        f.write("// changed\n")
    second = kernels.library_path.__wrapped__()  # a build, which prunes
    assert second != first and first.exists() and (cache / f"cpu_attention-{recent}.so").exists()
    assert not (cache / f"cpu_attention-{stale}.so").exists()
    assert not (cache / f"dispatch-{stale}-2-cores.json").exists()
    assert (cache / f"dispatch-{recent}-2-cores.json").exists()
    assert not (cache / f"dispatch-{recent}.json").exists()
    objects = {path.name for path in cache.glob("objects/*.o")}  # the ones the link used
    assert len(objects) == len(list(native.glob("*.cc")))
    assert first_gru.name not in objects and "gru-old.o" not in objects


_LOAD_AND_RUN = """
import numpy as np
from hw2jax import kernels
kernels.register_targets()
print(kernels.library_path())
x = np.random.default_rng(0).standard_normal((1, 9, 1, 16)).astype(np.float32)
print(float(np.abs(np.asarray(kernels.cpu_attention(x, x, x)) - x).max()))
"""


@pytest.mark.slow
def test_an_unloadable_cached_library_is_rebuilt(tmp_path, monkeypatch):
    """Garbage under the cached library's name: the next process rebuilds it and computes the
    right thing. (A fresh process: jax takes one handler per target name per process.)"""
    objects = build.cache_dir() / "objects"  # the rebuild links them: a test of loading
    if objects.is_dir():
        shutil.copytree(objects, tmp_path / "objects")
    monkeypatch.setenv("HW2JAX_KERNEL_CACHE", str(tmp_path))
    target = build.library_target()
    target.write_bytes(b"not a shared library")
    env = dict(os.environ, HW2JAX_KERNEL_CACHE=str(tmp_path))
    run = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_RUN], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    path, max_error = run.stdout.splitlines()[:2]
    assert path == str(target) and target.read_bytes()[:4] == b"\x7fELF"  # built again
    x = np.random.default_rng(0).standard_normal((1, 9, 1, 16)).astype(np.float32)
    expected = float(np.abs(ref_softmax_np(x, x, x) - x).max())
    assert float(max_error) == pytest.approx(expected, abs=2e-5)


def test_bert_attention_choice():
    config = bert.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 10)))
    mask = jnp.asarray(np.arange(10)[None] < np.array([[10], [6]]))
    params = bert.BertModel(config).init(jax.random.key(0), ids)["params"]
    out = {
        impl: bert.BertModel(config, implementation=impl).apply({"params": params}, ids, mask)[0]
        for impl in ("fused_cpu", "xla")
    }
    np.testing.assert_allclose(out["fused_cpu"], out["xla"], atol=2e-5)
    # bf16 compute: the kernel gets upcast q, k, v; within bf16's rounding of the float32 result.
    bf16 = bert.BertModel(config, jnp.bfloat16, implementation="fused_cpu").apply(
        {"params": params}, ids, mask
    )[0]
    np.testing.assert_allclose(np.asarray(bf16, np.float32), out["xla"], atol=6e-2)
    with pytest.raises(ValueError, match="unknown implementation 'flash' for BertModel; use one"):
        bert.BertModel(config, implementation="flash").apply({"params": params}, ids)
    # Attention dropout: both paths drop the same probabilities for the same rngs, forward and
    # backward, and the output differs from the deterministic one.
    rngs = {"dropout": jax.random.key(1)}

    def train_step(impl):
        def loss(p):
            model = bert.BertModel(config, implementation=impl)
            hidden = model.apply({"params": p}, ids, mask, deterministic=False, rngs=rngs)[0]
            return jnp.sum(hidden * weights), hidden

        return jax.grad(loss, has_aux=True)(params)

    weights = np.random.default_rng(2).standard_normal(out["xla"].shape).astype(np.float32)
    (fused_grads, fused), (xla_grads, xla) = train_step("fused_cpu"), train_step("xla")
    np.testing.assert_allclose(fused, xla, atol=2e-5)
    assert not np.allclose(fused, out["xla"], atol=1e-3)
    for got, want in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(xla_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)


def _uses_kernel(model, params, ids) -> bool:
    program = jax.jit(lambda p: model.apply({"params": p}, ids)[0]).lower(params).as_text()
    return "hw2jax_cpu_attention" in program


@pytest.mark.parametrize(
    "features,fused",
    [
        ({"avx2": True, "avx512f": False, "avx512_bf16": False}, True),  # AVX2-only EPYC
        ({"avx2": True, "avx512f": True, "avx512_bf16": True}, True),  # Zen 4, Sapphire Rapids
        ({"avx2": False, "avx512f": False}, False),  # no /proc/cpuinfo, or another ISA
    ],
)
def test_auto_uses_the_kernel_only_where_it_pays(monkeypatch, features, fused):
    monkeypatch.delenv("HW2JAX_KERNEL_MARCH", raising=False)  # a native build for these CPUs
    monkeypatch.setattr(cpu, "cpu_vector_features", lambda: features)
    assert attention.dispatch.this_machine().fused_cpu_pays_off is fused
    config = bert.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    ids = jnp.ones((1, 8), jnp.int32)
    params = bert.BertModel(config).init(jax.random.key(0), ids)["params"]
    assert _uses_kernel(bert.BertModel(config), params, ids) is fused  # "auto"
    assert _uses_kernel(bert.BertModel(config, implementation="fused_cpu"), params, ids)  # insists
    assert not _uses_kernel(bert.BertModel(config, implementation="xla"), params, ids)


def test_auto_follows_the_build_target(monkeypatch):
    """$HW2JAX_KERNEL_MARCH builds for another CPU; auto follows that build's features: the
    kernels with AVX2 (their tiles sized to its registers), XLA's forms without."""

    def machine():
        features = kernels.kernel_vector_features()
        return features, attention.dispatch.Machine("cpu", kernel_features=tuple(features.items()))

    monkeypatch.setenv("HW2JAX_KERNEL_MARCH", "x86-64-v3")  # AVX2, no AVX-512
    features, with_avx2 = machine()
    assert not features["avx512f"] and features["avx2"] == cpu.cpu_vector_features()["avx2"]
    assert with_avx2.fused_cpu_pays_off == features["avx2"]
    monkeypatch.setenv("HW2JAX_KERNEL_MARCH", "x86-64-v2")  # SSE4.2, no AVX
    features, without = machine()
    assert not features["avx2"] and not features["avx512f"]
    assert not without.fused_cpu_pays_off


# Run in a fresh process whose kernels are built for AVX2: every head dim's split of the tiles
# (4 rows by 3 or 2 vectors), in the flash kernels and the linear ones, forward and backward.
_AVX2_TILES_SCRIPT = """
import sys, jax, jax.numpy as jnp, numpy as np
from hw2jax import kernels
assert not kernels.kernel_vector_features()["avx512f"], kernels.kernel_vector_features()
inputs, results = np.load(sys.argv[1]), {}
for d in kernels.SUPPORTED_HEAD_DIMS:
    q, k, v, bias, g = (inputs[f"{name}{d}"] for name in ("q", "k", "v", "bias", "g"))
    for causal in (False, True):
        attend = lambda q, k, v, b: kernels.cpu_flash_attention(q, k, v, b, causal=causal)
        out, pullback = jax.vjp(attend, q, k, v, bias)
        results[f"flash{d}_{causal}"] = np.stack([out, *pullback(jnp.asarray(g))[:3]])
    fq, fk = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    num, pullback = jax.vjp(lambda *x: kernels.causal_linear_product_cpu(*x)[0], fq, fk, v)
    results[f"causal_linear{d}"] = np.stack([num, *pullback(jnp.asarray(g))])
    out, pullback = jax.vjp(kernels.linear_attention_cpu, q, k, v)
    results[f"linear{d}"] = np.stack([out, *pullback(jnp.asarray(g))])
np.savez(sys.argv[2], **results)
"""


@pytest.mark.slow
def test_avx2_tiles_match_float64_at_every_head_dim(tmp_path):
    """The tiles an AVX2-only CPU runs (16 registers: 4 rows by 3 vectors of columns, and by 2
    for what is left), which a CPU with AVX-512 runs only when built for AVX2 (in a fresh
    process; an AVX2-only CPU runs its own build there): softmax attention with a
    key bias, causal or not, causal linear attention's products and non-causal linear
    attention, values and gradients, against float64 closed forms at every head dim."""
    features = cpu.cpu_vector_features()
    if not features["avx2"] or kernels.build_error() is not None:
        pytest.skip("the kernels need AVX2 and a C++ compiler")
    rng = np.random.default_rng(5)
    shape = lambda d: (1, 70, 2, d)  # noqa: E731 (70 keys: a whole block and a cut one)
    inputs = {}
    for d in kernels.SUPPORTED_HEAD_DIMS:
        for name in "qkvg":
            inputs[f"{name}{d}"] = rng.standard_normal(shape(d)).astype(np.float32)
        masked = rng.random((1, 70)) < 0.2
        masked[:, 0] = False  # causal row 0 sees key 0 alone: masked, the row has no keys
        bias = 2 * rng.standard_normal((1, 70))  # any values, not only a mask's 0
        inputs[f"bias{d}"] = np.where(masked, MASKED, bias).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", **inputs)
    env = fresh_process_env()
    if features["avx512f"]:  # else this CPU's own build has the AVX2 tiles: no second build
        env["HW2JAX_KERNEL_MARCH"] = "x86-64-v3"
    run = subprocess.run(
        [sys.executable, "-c", _AVX2_TILES_SCRIPT, tmp_path / "inputs.npz", tmp_path / "out.npz"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")

    def causal_product(fq, fk, v):
        a = jnp.einsum("bqhd,bkhd->bhqk", fq, fk) * jnp.tril(jnp.ones((70, 70)))
        return jnp.einsum("bhqk,bkhe->bqhe", a, v)

    def linear(q, k, v):
        return explicit_linear_jnp(q, k, v, "elu", causal=False)

    for d in kernels.SUPPORTED_HEAD_DIMS:
        q, k, v, bias, g = (inputs[f"{name}{d}"] for name in ("q", "k", "v", "bias", "g"))
        scale = 1.0 / np.sqrt(d)
        for causal in (False, True):
            out, *grads = got[f"flash{d}_{causal}"]
            want = ref_softmax_np(q, k, v, causal=causal, key_bias=bias, scale=scale)
            np.testing.assert_allclose(out, want, atol=6e-5, rtol=1e-5, err_msg=f"D={d}")
            refs = _softmax_gradients_np(q, k, v, g, causal, scale, bias)[:3]
            for name, grad, ref in zip("qkv", grads, refs, strict=True):
                np.testing.assert_allclose(
                    grad, ref, atol=2e-4, rtol=1e-4, err_msg=f"d{name} D={d}"
                )
        with jax.enable_x64(True):
            x64 = [jnp.asarray(a, jnp.float64) for a in (q, k, v, g)]
            fq, fk = jax.nn.elu(x64[0]) + 1, jax.nn.elu(x64[1]) + 1
            for key, formula, args in (
                (f"causal_linear{d}", causal_product, (fq, fk, x64[2])),
                (f"linear{d}", linear, x64[:3]),
            ):
                want, pullback = jax.vjp(formula, *args)
                for part, ref in zip(got[key], (want, *pullback(x64[3])), strict=True):
                    # Unnormalised sums of up to 70 terms in the hundreds: float32 rounding
                    # scales with the largest, so the bound does too.
                    bound = 1e-4 * max(1.0, float(np.abs(ref).max()) / 100)
                    np.testing.assert_allclose(part, ref, atol=bound, rtol=1e-4, err_msg=key)


def test_cpu_vector_features_read_the_cpu_flags(tmp_path):
    from hw2jax.cpu import cpu_vector_features

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nflags\t\t: fpu\n")
    assert cpu_vector_features(str(info)) == {
        "avx2": True,
        "avx512f": False,
        "avx512_bf16": False,
        "amx_tile": False,
        "amx_bf16": False,
    }
    info.write_text("flags\t\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert all(cpu_vector_features(str(info)).values())
    assert not any(cpu_vector_features(str(tmp_path / "missing")).values())


def test_the_peak_estimate_counts_each_cpus_fma_lanes(tmp_path, monkeypatch):
    """FLOPs per cycle per core (cpu.peak_fp32_gflops's table) from the vendor, family, model
    and flags; the peak is cores x GHz x that."""
    from hw2jax import cpu

    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    info = tmp_path / "cpuinfo"

    def peak(vendor, family, model, flags, mhz="2500.000"):
        lines = [f"vendor_id\t: {vendor}", f"cpu family\t: {family}", f"flags\t\t: {flags}"]
        lines += [f"model\t\t: {model}"] if model is not None else []
        lines += [f"cpu MHz\t\t: {mhz}"] if mhz is not None else []
        info.write_text("\n".join(lines) + "\n")
        return cpu.peak_fp32_gflops(str(info))

    amd, intel = "AuthenticAMD", "GenuineIntel"
    for vendor, family, model, flags, lanes in (
        (amd, 23, 1, "avx2", 16),  # Zen
        (amd, 23, 48, "avx2", 16),
        (amd, 23, None, "avx2", 16),  # no model line: read as 0
        (amd, 23, 49, "avx2", 32),  # Zen 2 (Rome)
        (amd, 25, 17, "avx2 avx512f", 32),  # Zen 4: AVX-512 on 256-bit halves
        (amd, 26, 2, "avx2 avx512f", 64),  # Zen 5
        (amd, 21, 2, "avx2", None),  # older AMD: unknown
        (intel, 6, 167, "avx2 avx512f", 64),
        (intel, 6, 85, "avx2", 32),
        (intel, 6, 30, "sse4_2", None),
        ("HygonGenuine", 24, 1, "avx2", None),
    ):
        got = peak(vendor, family, model, flags)
        assert got["flops_per_cycle_per_core"] == lanes, (vendor, family, model)
        assert got["gflops"] == (2 * 2.5 * lanes if lanes else None)
        assert (got["cores"], got["ghz"]) == (2, 2.5)
    no_clock = peak(intel, 6, 167, "avx2 avx512f", mhz=None)
    assert no_clock["ghz"] is None and no_clock["gflops"] is None
    # bf16 products are native on accelerators and on CPUs with AVX512-BF16 or AMX-BF16.
    assert cpu.native_bf16("gpu", str(tmp_path / "missing"))
    for flags, native in (("avx2 avx512f", False), ("avx512_bf16", True), ("amx_bf16", True)):
        info.write_text(f"flags\t\t: {flags}\n")
        assert cpu.native_bf16("cpu", str(info)) == native, flags


def test_the_same_ffi_headers_anywhere_share_the_cached_library(tmp_path, monkeypatch):
    """A venv that links this jax in (the wheel test's), or a fresh venv with the same jax (a
    clean clone's), finds the library built here; headers that differ get their own."""
    import jax

    real = Path(jax.ffi.include_dir())
    here = build.library_target()
    (tmp_path / "linked").symlink_to(real)
    monkeypatch.setattr(jax.ffi, "include_dir", lambda: str(tmp_path / "linked"))
    assert build.library_target() == here
    shutil.copytree(real, tmp_path / "copied")
    monkeypatch.setattr(jax.ffi, "include_dir", lambda: str(tmp_path / "copied"))
    assert build.library_target() == here
    header = next(p for p in sorted((tmp_path / "copied").rglob("*.h")))
    header.write_bytes(header.read_bytes() + b"\n// another jax\n")
    assert build.library_target() != here


def test_a_change_to_any_kernel_source_builds_a_new_library(tmp_path, monkeypatch):
    """The library is keyed by every file in native/, the shared header included: a library
    built from older sources is never loaded for newer ones."""
    here = build.library_target()
    copy = tmp_path / "native"
    shutil.copytree(build.NATIVE_DIR, copy)
    monkeypatch.setattr(build, "NATIVE_DIR", copy)
    assert build.library_target() == here
    for name in ("common.h", "rows.cc"):
        (copy / name).write_bytes((copy / name).read_bytes() + b"\n// changed\n")
        assert build.library_target() != here
        here = build.library_target()


def test_fma_chains_run_exactly_the_multiply_adds_they_count():
    """The peak probe's loop against the closed form a_n = x^n a_0 + y (1 - x^n) / (1 - x): one
    iteration more or fewer would be off by ~4e-4, far outside float32 rounding."""
    start = np.array([0.0, 0.5, -1.0, 2.0, 3.0], np.float32)
    x, y, n = 0.999, 0.001, 1000
    got, lanes = jax.jit(kernels.fma_chains, static_argnums=(1, 2, 3))(start, n, x, y)

    def closed_form(n):
        x64, y64 = np.float64(np.float32(x)), np.float64(np.float32(y))
        return x64**n * start + y64 * (1 - x64**n) / (1 - x64)

    np.testing.assert_allclose(got, closed_form(n), rtol=2e-5, atol=2e-5)
    assert np.abs(closed_form(n + 1) - closed_form(n)).min() > 1e-4
    assert int(lanes[0]) % 8 == 0 and int(lanes[0]) >= 96  # chains x 8 or 16 lanes
    assert kernels.fma_chains(start[:0], n, x, y)[0].shape == (0,)


def test_the_measured_peak_counts_two_flops_per_multiply_add_of_its_best_run(monkeypatch):
    """A fake clock: each call of the chains takes 1 us an iteration (the second of the three
    compared runs 2 us), with 64 multiply-adds an item an iteration on 16 items. Runs grow 8-fold
    to 10 ms, are then sized to 0.25 s, and the best gives 2 x 64 x 16 / 1 us = 2.048 GFLOP/s."""
    import types

    from hw2jax.kernels import peak

    clock, calls = [0.0], []

    def chains(start, iterations, x, y):
        calls.append(iterations)
        clock[0] += iterations * (2e-6 if len(calls) == 9 else 1e-6)
        return start, jnp.array([64.0], jnp.float32)

    monkeypatch.setattr(peak, "cpu_attention_unavailable_reason", lambda *a: None)
    monkeypatch.setattr(peak.cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(peak, "fma_chains", chains)
    fake_jax = types.SimpleNamespace(jit=lambda f, **_: f, block_until_ready=lambda x: x)
    monkeypatch.setattr(peak, "jax", fake_jax)
    monkeypatch.setattr(peak.time, "perf_counter", lambda: clock[0])
    assert peak.fma_peak_gflops(seconds=0.25, repeats=3) == pytest.approx(2.048)
    assert calls[:6] == [1000, 1000, 8000, 8000, 64000, 64000]
    assert calls[6:] == [calls[6]] * 4 and abs(calls[6] - 250_000) <= 1  # 0.25 s, as clocked
