"""The bf16 matmul on AMX tiles or AVX512-BF16 pair dots: products and gradients against
float64 (on CPUs with either), BERT's bf16 attention on the tiles (AMX-BF16 only), and the
dispatch rule that sends dense layers to them, with the CPU faked every way."""

import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gelu64, gelu_slope64, run_on_host_devices

from hw2jax import kernels
from hw2jax.attention import dispatch
from hw2jax.errors import InputError
from hw2jax.models.layers import dot_float32_out, xla_dot

AMX = (("amx_bf16", True), ("avx512f", True))
NO_AMX = (("amx_bf16", False), ("avx512f", True))
PAIR_DOTS = (("amx_bf16", False), ("avx512_bf16", True), ("avx512f", True))
DENSE = (((2,), (0,)), ((), ()))  # nn.Dense's product for a [b, n, k] input

needs_amx = pytest.mark.skipif(
    kernels.amx_matmul_unavailable_reason() is not None,
    reason=f"no AMX-BF16 here: {kernels.amx_matmul_unavailable_reason()}",
)
needs_products = pytest.mark.skipif(
    kernels.bf16_products_unavailable_reason() is not None,
    reason=f"no bf16 product kernel here: {kernels.bf16_products_unavailable_reason()}",
)


def bf16_pair(key, m, k, n):
    a, b = jax.random.normal(jax.random.key(key), (2, m * k + k * n)).reshape(2, -1)
    return a[: m * k].reshape(m, k).astype(jnp.bfloat16), b[: k * n].reshape(k, n).astype(
        jnp.bfloat16
    )


def f64(x):
    return np.asarray(x.astype(jnp.float32), dtype=np.float64)


@needs_products
@pytest.mark.parametrize(
    "m,k,n", [(64, 64, 32), (45, 77, 50), (1, 32, 16), (300, 130, 97), (200, 1100, 40)]
)
def test_products_match_float64(m, k, n):
    # Tails in every dimension (rows past 32, K past 32, columns past 32 are zero-padded), and
    # K over the kernel's 512-long chunks, whose partial sums are carried between them.
    a, b = bf16_pair(m + k + n, m, k, n)
    out = kernels.amx_matmul(a, b)
    assert out.dtype == jnp.float32 and out.shape == (m, n)
    np.testing.assert_allclose(out, f64(a) @ f64(b), rtol=1e-5, atol=1e-4)


@needs_products
@pytest.mark.parametrize("batched", [False, True])
def test_bf16_results_are_the_float32_ones_rounded(batched):
    # Rounded to nearest even as they leave the tiles: the same bits as XLA's convert.
    a, b = bf16_pair(11, 3 * 45, 70, 50)
    if batched:
        a, b = a.reshape(3, 45, 70), jnp.stack([b, b * 2, -b])
        product = functools.partial(kernels.amx_batched_matmul, transpose_b=False)
    else:
        product = kernels.amx_matmul
    rounded = product(a, b, out_dtype=jnp.bfloat16)
    assert rounded.dtype == jnp.bfloat16
    np.testing.assert_array_equal(rounded, product(a, b).astype(jnp.bfloat16))
    with pytest.raises(InputError, match="float32 or bfloat16, not float16"):
        product(a, b, out_dtype=jnp.float16)


@needs_products
def test_gradients_match_float64_and_leading_axes_fold():
    # The weight gradient contracts over all 600 rows: K in two chunks, the second a tail.
    a, b = bf16_pair(1, 3 * 200, 70, 36)
    a = a.reshape(3, 200, 70)
    g = jax.random.normal(jax.random.key(2), (3, 200, 36))

    def loss(a, b):
        return jnp.sum(g * kernels.amx_matmul(a, b))

    da, db = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
    g16 = f64(g.astype(jnp.bfloat16)).reshape(-1, 36)  # cotangents are rounded to bf16
    a2 = f64(a).reshape(-1, 70)
    # Both are rounded to bf16 on the way out: one bf16 step (2^-8) of relative error.
    np.testing.assert_allclose(f64(da).reshape(-1, 70), g16 @ f64(b).T, rtol=2**-8, atol=1e-6)
    np.testing.assert_allclose(f64(db), a2.T @ g16, rtol=2**-8, atol=1e-6)


def op(x, transposed):
    return np.swapaxes(x, -1, -2) if transposed else x


@needs_products
@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (False, True), (True, False)])
def test_batched_products_and_gradients_match_float64(transpose_a, transpose_b):
    # The ViT's regrouped attention: [b, (n h), c] x [b, n, c]^T and [b, (n h), n] x [b, n, c],
    # with tails in every axis; each form's two gradients are two more forms.
    batch, m, k, n = 5, 70, 50, 36
    key = jax.random.split(jax.random.key(transpose_a + 2 * transpose_b), 3)
    a = jax.random.normal(key[0], (batch, k, m) if transpose_a else (batch, m, k))
    b = jax.random.normal(key[1], (batch, n, k) if transpose_b else (batch, k, n))
    a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    g = jax.random.normal(key[2], (batch, m, n))

    def loss(a, b):
        return jnp.sum(g * kernels.amx_batched_matmul(a, b, transpose_a, transpose_b))

    out = kernels.amx_batched_matmul(a, b, transpose_a, transpose_b)
    np.testing.assert_allclose(
        out, op(f64(a), transpose_a) @ op(f64(b), transpose_b), rtol=1e-5, atol=1e-4
    )
    da, db = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
    g16 = f64(g.astype(jnp.bfloat16))
    d_op_a = g16 @ np.swapaxes(op(f64(b), transpose_b), -1, -2)  # d op(a), then undo op
    d_op_b = np.swapaxes(op(f64(a), transpose_a), -1, -2) @ g16
    np.testing.assert_allclose(f64(da), op(d_op_a, transpose_a), rtol=2**-8, atol=1e-6)
    np.testing.assert_allclose(f64(db), op(d_op_b, transpose_b), rtol=2**-8, atol=1e-6)


@needs_products
def test_the_vit_in_bf16_takes_the_kernel_and_agrees_with_xla(monkeypatch):
    from hw2jax.models.vit import ViT

    images = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))
    model = ViT(depth=2, dtype=jnp.bfloat16)  # every kind of product, in a third of the compile
    params = model.init(jax.random.key(1), images)["params"]

    def loss(params):
        return jnp.mean(model.apply({"params": params}, images) ** 2)

    grads = {}
    for path in ("xla", "amx"):
        monkeypatch.setenv(dispatch.MATMUL_ENV, path)
        hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
        assert ("hw2jax_cpu_amx_matmul" in hlo) == (path == "amx")
        grads[path] = jax.jit(jax.grad(loss))(params)
    for x, y in zip(jax.tree.leaves(grads["amx"]), jax.tree.leaves(grads["xla"]), strict=True):
        scale = float(jnp.abs(y).max()) + 1e-6
        assert float(jnp.abs(x - y).max()) <= 0.05 * scale  # bf16 rounding in other places


@needs_products
def test_dense_layers_take_the_kernel_and_agree_with_xla(monkeypatch):
    a, b = bf16_pair(3, 4 * 128, 384, 96)
    a = a.reshape(4, 128, 384)
    monkeypatch.setenv(dispatch.MATMUL_ENV, "xla")
    via_xla = jax.jit(lambda a, b: dot_float32_out(a, b, DENSE))(a, b)
    monkeypatch.setenv(dispatch.MATMUL_ENV, "auto")
    hlo = jax.jit(lambda a, b: dot_float32_out(a, b, DENSE)).lower(a, b).as_text()
    assert "hw2jax_cpu_amx_matmul" in hlo
    via_amx = jax.jit(lambda a, b: dot_float32_out(a, b, DENSE))(a, b)
    np.testing.assert_allclose(via_amx, via_xla, rtol=1e-4, atol=1e-3)


def measuring_into(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HW2JAX_AUTO", "measure")
    monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
    monkeypatch.setattr(dispatch, "cache_file", lambda: tmp_path / "dispatch-test.json")


def winning_apart(monkeypatch, tmp_path, forward_winner: str) -> str:
    """Measuring on with timings faked: ``forward_winner`` ("amx" or "xla") wins every class
    timed forward and the other path every class timed with gradients (other operations' paths
    tie, and take their rule). Returns the other path."""
    measuring_into(monkeypatch, tmp_path)
    other = {"amx": "xla", "xla": "amx"}[forward_winner]
    fast = {False: forward_winner, True: other}

    def fake(paths, measure, gradient, rule=None):
        return {name: (1e-3 if name == fast[gradient] else 2e-3) for name in paths}

    monkeypatch.setattr(dispatch, "time_paths", fake)
    return other


def summed_gradients(product):
    """The gradients of sum(g * product(a, b)) for a fixed g, a's and b's."""

    def loss(a, b):
        out = product(a, b)
        return jnp.sum(jax.random.normal(jax.random.key(7), out.shape) * out)

    return jax.grad(loss, argnums=(0, 1))


@needs_products
def test_a_measured_bf16_product_runs_the_path_its_timings_chose(monkeypatch, tmp_path):
    """Unfaked: on a CPU that measures, a bf16 dense layer's product is timed on the kernel and
    on XLA's dot, forward in a forward-only program and with its output and both gradients in
    a differentiated one, each program timing its own class only; each class is cached, and
    each program runs its class's faster path: the kernel's custom call where it won, XLA's
    dot where it lost."""
    measuring_into(monkeypatch, tmp_path)
    a, b = bf16_pair(3, 4 * 128, 384, 96)
    a = a.reshape(4, 128, 384)

    def product(a, b):
        return dot_float32_out(a, b, DENSE)

    for program, timed in [(product, "fwd"), (summed_gradients(product), "fwd+bwd")]:
        with dispatch.recording() as taken:
            hlo = jax.jit(program).lower(a, b).as_text()
        ((key, record),) = taken.items()
        assert key.startswith(f"bf16_dense {timed} rows 2^9 384x96 bfloat16")
        assert set(record["ms"]) == {"amx", "xla"} and min(record["ms"].values()) > 0
        assert record["path"] == dispatch.choose(record["ms"], ["amx", "xla"], "amx")
        assert ("hw2jax_cpu_amx_matmul" in hlo) == (record["path"] == "amx")
        cached = json.loads((tmp_path / "dispatch-test.json").read_text())["classes"]
        assert cached[key]["ms"] == record["ms"]


@needs_products
@pytest.mark.parametrize("forward_winner", ["amx", "xla"])
def test_forward_and_differentiated_products_run_their_own_classes_winners(
    forward_winner, monkeypatch, tmp_path
):
    """Timings faked so that one path wins forward and the other with gradients (as on pair
    dot products): the forward-only program computes the forward winner's bits, and the
    differentiated program the other path's gradients, bit for bit."""
    other = winning_apart(monkeypatch, tmp_path, forward_winner)
    a, b = bf16_pair(5, 4 * 128, 384, 96)
    a = a.reshape(4, 128, 384)
    forms = {"amx": kernels.amx_matmul, "xla": xla_dot}

    def product(a, b):
        return dot_float32_out(a, b, DENSE)

    out = jax.jit(product)(a, b)
    np.testing.assert_array_equal(out, jax.jit(forms[forward_winner])(a, b))
    grads = jax.jit(summed_gradients(product))(a, b)
    for got, want in zip(grads, jax.jit(summed_gradients(forms[other]))(a, b), strict=True):
        np.testing.assert_array_equal(got, want)
    kernel_in = {
        "forward": "hw2jax_cpu_amx_matmul" in jax.jit(product).lower(a, b).as_text(),
        "gradients": "hw2jax_cpu_amx_matmul"
        in jax.jit(summed_gradients(product)).lower(a, b).as_text(),
    }
    assert kernel_in == {"forward": forward_winner == "amx", "gradients": other == "amx"}


@needs_products
@pytest.mark.parametrize("m,k,n", [(64, 64, 32), (45, 77, 50), (300, 130, 97), (40, 600, 33)])
def test_dense_gelu_matches_float64(m, k, n):
    # Tails in rows, K and columns (the bias padded past N), K over a chunk, and erf's range:
    # the pre-activations run from about -6 to 6.
    a, b = bf16_pair(m * k, m, k, n)
    bias = jax.random.normal(jax.random.key(n), (n,)) * 2
    out = kernels.amx_dense(a.reshape(1, m, k), b, bias, gelu=True, out_dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, m, n)
    z = f64(a) @ f64(b) + f64(bias)
    np.testing.assert_allclose(f64(out[0]), gelu64(z), rtol=2**-8, atol=1e-5)


@needs_products
def test_dense_gelu_gradients_match_float64():
    a, b = bf16_pair(7, 96, 64, 40)
    bias = jax.random.normal(jax.random.key(8), (40,))
    g = jax.random.normal(jax.random.key(9), (96, 40))

    def loss(*args):
        return jnp.sum(g * kernels.amx_dense(*args, gelu=True, out_dtype=jnp.bfloat16))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(a, b, bias)
    z = f64(a) @ f64(b) + f64(bias)
    dz = f64(g.astype(jnp.bfloat16)) * gelu_slope64(z)  # the cotangent arrives rounded to bf16
    for got, want in zip(grads, (dz @ f64(b).T, f64(a).T @ dz, dz.sum(0)), strict=True):
        scale = np.abs(want).max()
        assert np.abs(f64(got) - want).max() <= 2**-7 * scale, (
            np.abs(f64(got) - want).max(),
            scale,
        )


def weights_with_ties(key, k, n):
    """float32 [k, n] weights, every third one exactly halfway between two bf16 values (its
    low 16 bits 0x8000), where rounding to nearest must break the tie to the even one."""
    w = np.asarray(0.1 * jax.random.normal(jax.random.key(key), (k, n)), np.float32)
    bits = w.view(np.uint32).copy()
    bits.flat[::3] = (bits.flat[::3] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)
    return jnp.asarray(bits.view(np.float32))


@needs_products
@pytest.mark.parametrize("m,k,n", [(64, 64, 32), (45, 77, 50), (300, 130, 97), (40, 600, 33)])
@pytest.mark.parametrize("biased,out", [(False, "float32"), (True, "float32"), (True, "bfloat16")])
def test_dense_on_float32_weights_is_xlas_steps_bitwise(m, k, n, biased, out):
    # Odd K (a last row without its pair), N past 16 and 32, K over a chunk; the weights rounded
    # to bf16 as the kernel packs them, the bias and the rounding of the output as it leaves
    # the tiles: the floats of XLA's convert, the product of the bf16 weights, XLA's add and
    # XLA's cast, and within bf16's rounding of the float64 sum.
    x = bf16_pair(m + n, m, k, n)[0].reshape(1, m, k)
    w = weights_with_ties(k * n, k, n)
    bias = jax.random.normal(jax.random.key(n), (n,)) if biased else None
    got = jax.jit(lambda x, w, b: kernels.amx_dense(x, w, b, out_dtype=out))(x, w, bias)
    assert got.dtype == jnp.dtype(out) and got.shape == (1, m, n)
    product = kernels.amx_matmul(x, w.astype(jnp.bfloat16))
    want = (product + bias if biased else product).astype(out)
    np.testing.assert_array_equal(f64(got), f64(want))
    z = f64(x[0]) @ f64(w.astype(jnp.bfloat16)) + (f64(bias) if biased else 0.0)
    np.testing.assert_allclose(f64(got[0]), z, rtol=2**-8 if out == "bfloat16" else 1e-5, atol=1e-4)


@needs_products
def test_float32_weights_give_the_floats_of_their_bf16_copy_and_xlas_gradients():
    x, _ = bf16_pair(3, 96, 77, 40)
    w = weights_with_ties(4, 77, 40)
    bias = jax.random.normal(jax.random.key(5), (40,))
    got = kernels.amx_dense(x, w, bias, gelu=True, out_dtype=jnp.bfloat16)
    rounded = kernels.amx_dense(x, w.astype(jnp.bfloat16), bias, gelu=True, out_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(f64(got), f64(rounded))
    g = jax.random.normal(jax.random.key(6), (96, 40))

    def steps(x, w, bias):  # what XLA computes without the kernel, as nn.Dense and GELU would
        h = jnp.dot(x, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return jax.nn.gelu(h + bias, approximate=False).astype(jnp.bfloat16)

    fused = jax.grad(
        lambda *a: jnp.sum(g * kernels.amx_dense(*a, gelu=True, out_dtype=jnp.bfloat16)),
        argnums=(0, 1, 2),
    )
    unfused = jax.grad(lambda *a: jnp.sum(g * steps(*a)), argnums=(0, 1, 2))
    for a, b in zip(jax.jit(fused)(x, w, bias), jax.jit(unfused)(x, w, bias), strict=True):
        assert a.dtype == b.dtype
        scale = np.abs(f64(b)).max()
        assert np.abs(f64(a) - f64(b)).max() <= 2**-7 * scale  # products in another order


def small_bf16_bert(hidden: int, intermediate: int, tokens: int):
    """A one-layer bf16 BERT of two heads on its fused kernels, two sequences of ``tokens``
    ids, and its parameters."""
    from hw2jax.models import bert

    config = bert.BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=32,
    )
    model = bert.BertModel(config, jnp.bfloat16, "fused_cpu")
    ids = jax.random.randint(jax.random.key(0), (2, tokens), 1, 100)
    return model, ids, model.init(jax.random.key(1), ids)["params"]


@needs_amx
def test_bert_in_bf16_runs_its_gelu_and_attention_on_the_tiles_and_agrees_with_xla(monkeypatch):
    model, ids, params = small_bf16_bert(hidden=64, intermediate=160, tokens=24)

    def apply(params, ids):  # a new function each time: jit's cache would keep the first path
        return jax.jit(lambda p, ids: model.apply({"params": p}, ids)[0]).lower(params, ids)

    monkeypatch.setenv(dispatch.MATMUL_ENV, "xla")
    via_xla = apply(params, ids).compile()(params, ids)
    monkeypatch.setenv(dispatch.MATMUL_ENV, "amx")  # these products are below the size rule
    lowered = apply(params, ids)
    text = lowered.as_text()
    # q, k, v with their biases and the intermediate layer with its GELU, bf16 out; the two
    # products before a residual layer norm, float32 out; the attention, bf16 out.
    assert text.count("hw2jax_cpu_amx_dense_bf16") == 4
    assert len(re.findall(r"hw2jax_cpu_amx_dense\b", text)) == 2
    assert text.count("hw2jax_cpu_amx_attention_bf16") == 1
    # The float32 weights reach the kernels as they are: no bf16 copy of any is made.
    for shape in ("64x64", "64x160", "160x64"):
        assert not re.search(
            rf"stablehlo.convert .*tensor<{shape}xf32>\) -> tensor<{shape}xbf16>", text
        )
    via_amx = lowered.compile()(params, ids)
    np.testing.assert_allclose(f64(via_amx), f64(via_xla), atol=0.05)  # bf16 steps, layer norm


@needs_products
@pytest.mark.parametrize("forward_winner", ["amx", "xla"])
def test_bert_in_bf16_runs_each_programs_own_winner_in_its_dense_layers(
    forward_winner, monkeypatch, tmp_path
):
    """bf16 timings faked so that one path wins BERT's dense products forward and the other
    with gradients: the features program runs them by the forward winner and the gradient
    program by the other."""
    other = winning_apart(monkeypatch, tmp_path, forward_winner)
    # 64 rows x 128 x 128: at AMX_MIN_MACS, so the rule would time them.
    model, ids, params = small_bf16_bert(hidden=128, intermediate=256, tokens=32)

    def features(params):
        return model.apply({"params": params}, ids)[0]

    on_kernel = re.compile(r"hw2jax_cpu_amx_(dense|matmul)")
    forward = jax.jit(features).lower(params).as_text()
    gradient = jax.jit(jax.grad(lambda p: jnp.sum(features(p)))).lower(params).as_text()
    assert len(on_kernel.findall(forward)) == (6 if forward_winner == "amx" else 0)
    assert bool(on_kernel.search(gradient)) == (other == "amx")
    assert "hw2jax_cpu_amx_dense" not in gradient  # its differentiated form is the product's


def attention64(q, k, v, key_bias):
    """softmax(q k^T / sqrt(D) + key_bias) v in float64, one (sequence, head) at a time."""
    q, k, v = f64(q), f64(k), f64(v)
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            s = q[b, :, h] @ k[b, :, h].T / math.sqrt(q.shape[-1]) + f64(key_bias[b])
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h]
    return out


@needs_amx
@pytest.mark.parametrize(
    "b,t,h,d", [(2, 37, 3, 32), (1, 100, 2, 64), (1, 70, 1, 16), (1, 5, 2, 48)]
)
def test_bf16_attention_matches_float64(b, t, h, d):
    # Keys past 64 and query rows past 16 are padding, D is padded to 32; a fifth of the keys
    # masked by finfo.min, as BERT masks padding, the others biased by N(0, 4) draws (any
    # values, not only a mask's 0).
    keys = jax.random.split(jax.random.key(t * d), 5)
    q, k, v = (jax.random.normal(x, (b, t, h, d)).astype(jnp.bfloat16) for x in keys[:3])
    masked = jax.random.uniform(keys[3], (b, t)) < 0.2
    biased = 2 * jax.random.normal(keys[4], (b, t))
    key_bias = jnp.where(masked, jnp.finfo(jnp.float32).min, biased)
    out = kernels.amx_attention(q, k, v, key_bias)
    assert out.dtype == jnp.float32 and out.shape == (b, t, h, d)
    rounded = kernels.amx_attention(q, k, v, key_bias, out_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(f64(rounded), f64(out.astype(jnp.bfloat16)))
    want = attention64(q, k, v, key_bias)
    # The probabilities are rounded to bf16 before they multiply v: about 2^-9 of each term.
    np.testing.assert_allclose(f64(out), want, atol=2**-7 * np.abs(want).max())


@needs_amx
def test_bert_attention_in_bf16_takes_the_tiles_and_its_gradient_is_the_float32_one(monkeypatch):
    from hw2jax.attention.key_bias import key_bias_attention

    keys = jax.random.split(jax.random.key(5), 4)
    q, k, v = (jax.random.normal(x, (2, 40, 2, 32)).astype(jnp.bfloat16) for x in keys[:3])
    key_bias = jnp.where(jnp.arange(40) < 33, 0.0, jnp.finfo(jnp.float32).min)[None].repeat(2, 0)
    g = jax.random.normal(keys[3], (2, 40, 2, 32))

    def loss(q, k, v):
        out = key_bias_attention(q, k, v, key_bias, scale=0.2, implementation="fused_cpu")
        return jnp.sum(g * out)

    monkeypatch.setenv(dispatch.MATMUL_ENV, "amx")  # this one is below the size rule
    assert "hw2jax_cpu_amx_attention" in jax.jit(lambda q: loss(q, k, v)).lower(q).as_text()
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    monkeypatch.setenv(dispatch.MATMUL_ENV, "xla")  # upcast to float32, the kernel before
    assert "amx" not in jax.jit(lambda k: loss(q, k, v)).lower(k).as_text()
    upcast = jax.jit(jax.grad(lambda *x: loss(*x), argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grads, upcast, strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_row_attention_rule_takes_amx_for_bf16_on_amx_cpus_only():
    rule = dispatch.bf16_row_attention
    cpu_amx = dispatch.Machine("cpu", kernel_features=AMX)
    bert = (32, 256, 12, 32)
    assert rule(bert, jnp.bfloat16, lambda: None, cpu_amx) == "amx"
    assert rule(bert, jnp.float32, lambda: None, cpu_amx) == "float32"
    assert rule((32, 256, 12, 40), jnp.bfloat16, lambda: None, cpu_amx) == "float32"
    assert rule((1, 8, 1, 32), jnp.bfloat16, lambda: None, cpu_amx) == "float32"  # small
    # Two products of T x T x D per (batch, head): 2 * 2 * 2 * 64 * 64 * 32 = AMX_MIN_MACS.
    assert rule((2, 64, 2, 32), jnp.bfloat16, lambda: None, cpu_amx) == "amx"
    assert rule((2, 63, 2, 32), jnp.bfloat16, lambda: None, cpu_amx) == "float32"
    no_amx = dispatch.Machine("cpu", kernel_features=NO_AMX)
    assert rule(bert, jnp.bfloat16, lambda: None, no_amx) == "float32"
    pair_dots = dispatch.Machine("cpu", kernel_features=PAIR_DOTS)  # products only, no tiles
    assert rule(bert, jnp.bfloat16, lambda: None, pair_dots) == "float32"
    assert rule(bert, jnp.bfloat16, lambda: "Linux refused the tiles", cpu_amx) == "float32"
    avx2 = dispatch.Machine("cpu", kernel_features=(("avx2", True),))  # neither feature listed
    assert rule(bert, jnp.bfloat16, lambda: None, avx2) == "float32"


def test_the_vit_step_drops_ynnpack_only_for_bf16_on_amx(monkeypatch):
    from hw2jax.models import vit
    from hw2jax.models.layers import NO_YNNPACK, xla_accepts

    monkeypatch.setattr(kernels, "amx_matmul_unavailable_reason", lambda: None)
    cpu_amx = dispatch.Machine("cpu", kernel_features=AMX)
    no_amx = dispatch.Machine("cpu", kernel_features=NO_AMX)
    dropped = dict(NO_YNNPACK) if xla_accepts(NO_YNNPACK) else {}
    assert dropped, "this jaxlib should know the option"
    assert vit.xla_compiler_options(jnp.bfloat16, cpu_amx) == dropped
    pair_dots = dispatch.Machine("cpu", kernel_features=PAIR_DOTS)  # YNNPACK stays there
    assert vit.xla_compiler_options(jnp.bfloat16, pair_dots) == {}
    assert vit.xla_compiler_options(jnp.float32, cpu_amx) == {}
    assert vit.xla_compiler_options(None, cpu_amx) == {}
    assert vit.xla_compiler_options(jnp.bfloat16, no_amx) == {}
    monkeypatch.setenv(dispatch.MATMUL_ENV, "xla")  # products on XLA's dot: YNNPACK stays
    assert vit.xla_compiler_options(jnp.bfloat16, cpu_amx) == {}


def test_the_rule_takes_amx_only_for_big_bf16_dense_products_on_amx_cpus():
    cpu_amx = dispatch.Machine("cpu", kernel_features=AMX)
    big = jnp.zeros((8, 128, 256), jnp.bfloat16), jnp.zeros((256, 512), jnp.bfloat16)
    ok = lambda: None  # noqa: E731

    def rule(lhs, rhs, machine=cpu_amx, dims=DENSE, reason=ok):
        return dispatch.dense_product(lhs, rhs, dims, reason, machine)

    assert rule(*big) == "amx"
    assert rule(*big, machine=dispatch.Machine("cpu", kernel_features=PAIR_DOTS)) == "amx"
    assert rule(*big, machine=dispatch.Machine("cpu", kernel_features=NO_AMX)) == "xla"
    assert rule(*big, machine=dispatch.Machine("gpu", nvidia=True)) == "xla"
    assert rule(*big, machine=dispatch.Machine("cpu", kernel_features=(("avx2", True),))) == "xla"
    assert rule(*big, reason=lambda: "Linux refused the tiles") == "xla"
    assert rule(big[0].astype(jnp.float32), big[1].astype(jnp.float32)) == "xla"
    assert rule(jnp.zeros((2, 8, 16), jnp.bfloat16), jnp.zeros((16, 16), jnp.bfloat16)) == "xla"
    batched = (((2,), (1,)), ((0,), (0,)))
    rhs3 = jnp.zeros((8, 256, 512), jnp.bfloat16)
    assert rule(big[0], rhs3, dims=batched) == "xla"


def test_the_environment_forces_a_path_and_a_bad_force_names_the_fix(monkeypatch):
    cpu_amx = dispatch.Machine("cpu", kernel_features=AMX)
    big = jnp.zeros((8, 128, 256), jnp.bfloat16), jnp.zeros((256, 512), jnp.bfloat16)
    monkeypatch.setenv(dispatch.MATMUL_ENV, "xla")
    assert dispatch.dense_product(*big, DENSE, lambda: None, cpu_amx) == "xla"
    monkeypatch.setenv(dispatch.MATMUL_ENV, "amx")
    small = jnp.zeros((2, 3), jnp.bfloat16), jnp.zeros((3, 4), jnp.bfloat16)
    assert dispatch.dense_product(*small, (((1,), (0,)), ((), ())), lambda: None, cpu_amx) == "amx"
    f32 = tuple(x.astype(jnp.float32) for x in big)  # not the kernel's: XLA's, even when forced
    assert dispatch.dense_product(*f32, DENSE, lambda: None, cpu_amx) == "xla"
    with pytest.raises(dispatch.ImplementationError, match=r"no AMX-BF16.*set it to auto"):
        dispatch.dense_product(*big, DENSE, lambda: "this CPU has no AMX-BF16", cpu_amx)
    # Forced on a CPU without the tiles (the products on pair dots): what only the tiles run
    # stays off them, with no error.
    pair_dots = dispatch.Machine("cpu", kernel_features=PAIR_DOTS)
    no_tiles = lambda: "this CPU has no AMX-BF16"  # noqa: E731
    bert = (32, 256, 12, 32)
    assert dispatch.bf16_row_attention(bert, jnp.bfloat16, no_tiles, pair_dots) == "float32"
    assert not dispatch.bf16_products_on_amx(no_tiles, pair_dots)
    assert dispatch.dense_product(*big, DENSE, lambda: None, pair_dots) == "amx"
    monkeypatch.setenv(dispatch.MATMUL_ENV, "mkl")
    with pytest.raises(
        dispatch.ImplementationError, match=r"unknown implementation 'mkl'.*xla, amx"
    ):
        dispatch.dense_product(*big, DENSE, lambda: None, cpu_amx)


def test_batched_rule_takes_bf16_three_axis_products_only():
    cpu_amx = dispatch.Machine("cpu", kernel_features=AMX)
    a = jnp.zeros((256, 200, 64), jnp.bfloat16)
    x = jnp.zeros((256, 50, 64), jnp.bfloat16)
    rule = dispatch.batched_product
    assert rule(a, x, False, True, lambda: None, cpu_amx) == "amx"
    assert rule(a, x, True, True, lambda: None, cpu_amx) == "xla"  # both transposed
    assert rule(a.astype(jnp.float32), x, False, True, lambda: None, cpu_amx) == "xla"
    assert rule(a[None], x[None], False, True, lambda: None, cpu_amx) == "xla"  # 4-D
    assert rule(a[:1, :8], x[:1], False, True, lambda: None, cpu_amx) == "xla"  # small
    no_amx = dispatch.Machine("cpu", kernel_features=NO_AMX)
    assert rule(a, x, False, True, lambda: None, no_amx) == "xla"


@pytest.mark.parametrize(
    "says,reason", [(-1, "built without AMX-BF16.*HW2JAX_KERNEL_MARCH"), (0, "Linux did not grant")]
)
def test_a_library_without_the_tiles_names_why(monkeypatch, says, reason):
    from hw2jax.kernels import matmul

    monkeypatch.setattr(matmul, "kernel_vector_features", lambda: {"amx_bf16": True})
    monkeypatch.setattr(matmul, "build_error", lambda: None)
    monkeypatch.setattr(matmul, "_library_says", lambda: says)
    assert re.search(reason, matmul.amx_matmul_unavailable_reason())


@pytest.mark.parametrize(
    "features,engine,reason",
    [
        ({"avx512_bf16": False, "amx_bf16": False}, 1, "neither AMX-BF16 nor AVX512-BF16"),
        ({"avx512_bf16": True}, -1, "built without AMX-BF16 or AVX512-BF16.*HW2JAX_KERNEL_MARCH"),
        ({"amx_bf16": True}, 0, "Linux did not grant"),
        ({"avx512_bf16": True}, 1, None),
    ],
)
def test_the_products_say_why_they_cannot_run(monkeypatch, features, engine, reason):
    from hw2jax.kernels import matmul

    monkeypatch.setattr(matmul, "kernel_vector_features", lambda: features)
    monkeypatch.setattr(matmul, "build_error", lambda: None)
    monkeypatch.setattr(matmul, "_products_engine", lambda: engine)
    said = matmul.bf16_products_unavailable_reason()
    assert said is None if reason is None else re.search(reason, said)


def test_bad_operands_get_clear_errors():
    with pytest.raises(InputError, match="bfloat16 arrays"):
        kernels.amx_matmul(jnp.zeros((4, 8)), jnp.zeros((8, 4)))
    with pytest.raises(InputError, match=r"\[K, N\]"):
        kernels.amx_matmul(jnp.zeros((4, 8), jnp.bfloat16), jnp.zeros((7, 4), jnp.bfloat16))
    with pytest.raises(InputError, match="one batch and matching"):
        kernels.amx_batched_matmul(
            jnp.zeros((2, 4, 8), jnp.bfloat16), jnp.zeros((3, 8, 4), jnp.bfloat16)
        )
    with pytest.raises(InputError, match="not both"):
        kernels.amx_batched_matmul(
            jnp.zeros((2, 8, 4), jnp.bfloat16), jnp.zeros((2, 4, 8), jnp.bfloat16), True, True
        )
    x, w = jnp.zeros((4, 8), jnp.bfloat16), jnp.zeros((8, 6), jnp.bfloat16)
    with pytest.raises(InputError, match=r"bias of shape \(6,\)"):
        kernels.amx_dense(x, w, jnp.zeros(8))
    with pytest.raises(InputError, match="K > 0"):
        kernels.amx_dense(x[:, :0], w[:0], jnp.zeros(6))
    with pytest.raises(InputError, match=r"bfloat16 x by bfloat16 or float32 weights.*Cast x"):
        kernels.amx_dense(x.astype(jnp.float32), w, jnp.zeros(6))
    with pytest.raises(InputError, match="bfloat16 or float32 weights"):
        kernels.amx_dense(x, w.astype(jnp.float16))
    with pytest.raises(InputError, match="GELU after a bias"):
        kernels.amx_dense(x, w.astype(jnp.float32), gelu=True)
    qkv = jnp.zeros((1, 8, 2, 32), jnp.bfloat16)
    with pytest.raises(InputError, match=r"takes bfloat16 q, k, v.*cpu_attention"):
        kernels.amx_attention(qkv.astype(jnp.float32), qkv, qkv)
    with pytest.raises(InputError, match="head dim must be one of"):
        kernels.amx_attention(qkv[..., :20], qkv[..., :20], qkv[..., :20])


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from hw2jax import kernels
mesh = Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(0)
a = jnp.asarray(rng.standard_normal((4, 40, 96)), jnp.bfloat16)
b = jnp.asarray(rng.standard_normal((96, 64)), jnp.bfloat16)
g = jnp.asarray(rng.standard_normal((4, 40, 64)), jnp.float32)
f = jax.jit(jax.grad(lambda a, b, g: jnp.sum(kernels.amx_matmul(a, b) * g), argnums=(0, 1)))
one = f(a, b, g)
rows, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
args = jax.device_put(a, rows), jax.device_put(b, whole), jax.device_put(g, rows)
hlo = f.lower(*args).compile().as_text()
two = f(*args)
calls = sorted({l.split("=")[1].split("custom-call")[0].strip().replace(" ", "")
                for l in hlo.splitlines() if "hw2jax_cpu_amx" in l and "custom-call(" in l})
error = max(float(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).max())
            for x, y in zip(one, two))
bias = jnp.asarray(rng.standard_normal(64), jnp.float32)
gelu = jax.jit(lambda a, b, bias: kernels.amx_dense(a, b, bias, gelu=True, out_dtype=jnp.bfloat16))
gelu_hlo = gelu.lower(args[0], args[1], bias).compile().as_text()
gelu_calls = sorted({l.split("=")[1].split("custom-call")[0].strip() for l in
                     gelu_hlo.splitlines() if "amx_dense" in l and "custom-call(" in l})
same = bool(jnp.array_equal(gelu(a, b, bias), gelu(args[0], args[1], bias)))
if kernels.amx_matmul_unavailable_reason() is None:  # the attention: AMX tiles only
    qkv = [jnp.asarray(rng.standard_normal((4, 24, 2, 32)), jnp.bfloat16) for _ in range(3)]
    attend = jax.jit(kernels.amx_attention)
    split = [jax.device_put(t, NamedSharding(mesh, P("data"))) for t in qkv]
    attend_hlo = attend.lower(*split).compile().as_text()
    same = same and bool(jnp.array_equal(attend(*qkv), attend(*split)))
    same = same and "all-gather" not in attend_hlo and "f32[2,24,2,32]" in attend_hlo
pair = [jnp.asarray(rng.standard_normal((4, 32, 48)), jnp.bfloat16) for _ in range(2)]
transposed = jax.jit(lambda x, y: kernels.amx_batched_matmul(x, y, transpose_a=True))
split_pair = [jax.device_put(t, NamedSharding(mesh, P("data"))) for t in pair]
same = same and bool(jnp.array_equal(transposed(*pair), transposed(*split_pair)))
print("all-gather" in hlo, "all-reduce" in hlo, ";".join(calls), error,
      "all-gather" in gelu_hlo, ";".join(gelu_calls), same)
"""


@needs_products
def test_on_a_mesh_each_device_multiplies_its_rows():
    """Rows split over 2 host devices: the product and the input gradient run on each device's
    half with no all-gather; the weight gradient's partial products are summed (one
    all-reduce); both gradients equal the one-device ones."""
    stdout = run_on_host_devices(_SHARDED)
    gathered, reduced, calls, error, gelu_gathered, gelu_calls, same = stdout.split()
    assert (gathered, reduced) == ("False", "True"), stdout
    # Only the gradients are asked for: the forward product is dead code, and each device's
    # calls are the input gradient on its 80 rows (bf16 as it leaves the tiles) and the weight
    # gradient's partial product (float32 until the sum).
    assert calls == "bf16[80,96]{1,0};f32[96,64]{1,0}", calls
    assert float(error) <= 2**-7, error  # at most one bf16 step of the gradients' size
    # The dense layer with its GELU: each device its 80 rows, the same bits as on one device;
    # the attention (where AMX runs it): each device its 2 sequences, no all-gather, the same
    # bits; a batched product with a transposed, split over the batch, the same bits.
    assert (gelu_gathered, gelu_calls, same) == ("False", "bf16[80,64]{1,0}", "True"), stdout
