"""The float32 dense kernel (:func:`hw2jax.kernels.float32_dense`): products, bias and GELU
against float64, every edge of its register tiles, its gradient (another form's), its errors,
its place in BERT's float32 layers and on a mesh."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gelu64, run_on_host_devices

from hw2jax import kernels
from hw2jax.attention import dispatch
from hw2jax.errors import InputError
from hw2jax.models import bert

needs_kernel = pytest.mark.skipif(
    kernels.float32_dense_unavailable_reason((1, 16), (16, 16), jnp.float32) is not None,
    reason="the CPU kernels cannot run here",
)


def operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    return x.astype(np.float32), w.astype(np.float32), rng.standard_normal(n).astype(np.float32)


def float64_dense(x, w, bias=None, gelu=False):
    """The layer in float64, from the float32 operands: the product as a plain sum."""
    h = x.astype(np.float64) @ w.astype(np.float64)
    h = h if bias is None else h + bias.astype(np.float64)
    return gelu64(h) if gelu else h


def relative_error(got, want, x, w, bias):
    """|got - want| over the sum's size, sum_k |x w| + |bias|: float32 rounding of a K-term
    sum stays within a few K-independent ulps of it when summed in order."""
    size = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64) + np.abs(bias)
    return float(np.max(np.abs(np.asarray(got, np.float64) - want) / size))


# Rows past the 6-row register tile and past items; columns past a 64-wide panel (AVX-512) or a
# 16-wide one (AVX2), and narrower than one; K over one 384-deep pass, and K = 1.
SHAPES = [(7, 5, 3), (97, 385, 70), (6, 1, 64), (200, 800, 130), (1, 16, 17), (1500, 96, 48)]


@needs_kernel
@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("epilogue", ["none", "bias", "bias_gelu"])
def test_products_match_float64(m, k, n, epilogue):
    x, w, bias = operands(m, k, n)
    given = None if epilogue == "none" else bias
    gelu = epilogue == "bias_gelu"
    got = kernels.float32_dense(jnp.asarray(x), jnp.asarray(w), given, gelu=gelu)
    want = float64_dense(x, w, given, gelu)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    assert relative_error(got, want, x, w, bias if given is not None else 0.0) < 4e-6


@needs_kernel
def test_leading_axes_fold_and_the_call_matches_xla_steps_to_float32_rounding():
    x, w, bias = operands(3 * 41, 64, 96)
    x3 = jnp.asarray(x).reshape(3, 41, 64)
    got = jax.jit(lambda *a: kernels.float32_dense(*a, gelu=True))(x3, jnp.asarray(w), bias)
    steps = kernels.xla_dense(x3, jnp.asarray(w), bias, gelu=True)
    assert got.shape == (3, 41, 96)
    assert relative_error(got.reshape(-1, 96), np.asarray(steps).reshape(-1, 96), x, w, bias) < 4e-6


@needs_kernel
def test_differentiated_it_runs_the_other_form_forward_and_backward():
    """Under jax.grad the call is ``differentiated``'s: its gradient, bit for bit, and a form
    with another gradient shows through (no gradient of the kernel's own is made up)."""
    x, w, bias = (jnp.asarray(t) for t in operands(24, 32, 48))
    g = jnp.asarray(np.random.default_rng(1).standard_normal((24, 48)), jnp.float32)

    def loss(form):
        return jax.grad(lambda *a: jnp.sum(g * form(*a)), argnums=(0, 1, 2))(x, w, bias)

    default = loss(lambda *a: kernels.float32_dense(*a, gelu=True))
    steps = loss(lambda *a: kernels.xla_dense(*a, gelu=True))
    for got, want in zip(default, steps, strict=True):
        np.testing.assert_array_equal(got, want)

    def doubled(x, w, bias):
        return 2.0 * kernels.xla_dense(x, w, bias)

    other = loss(lambda *a: kernels.float32_dense(*a, differentiated=doubled))
    np.testing.assert_array_equal(other[2], 2.0 * jnp.sum(g, axis=0))


@needs_kernel
def test_bad_operands_get_clear_errors():
    x, w, bias = (jnp.asarray(t) for t in operands(4, 8, 6))
    with pytest.raises(InputError, match="float32; got bfloat16"):
        kernels.float32_dense(x.astype(jnp.bfloat16), w)
    with pytest.raises(InputError, match=r"x \[\.\.\., K\] and a kernel \[K, N\]"):
        kernels.float32_dense(x, w[:5])
    with pytest.raises(InputError, match="K is empty"):
        kernels.float32_dense(x[:, :0], w[:0])
    with pytest.raises(InputError, match="float32 weights"):
        kernels.float32_dense(x, w.astype(jnp.bfloat16))
    with pytest.raises(InputError, match=r"bias of shape \(6,\)"):
        kernels.float32_dense(x, w, bias[:5])
    with pytest.raises(InputError, match="GELU after a bias"):
        kernels.float32_dense(x, w, gelu=True)


def _tiny_bert():
    config = bert.BertConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)))
    model = bert.BertModel(config)
    params = model.init(jax.random.key(0), ids)["params"]
    return model, params, ids


@needs_kernel
def test_bert_in_float32_runs_its_dense_layers_on_the_kernel_and_agrees_with_xla(monkeypatch):
    """Forced on, six products a layer (q, k, v, the attention's output, the intermediate
    layer with its GELU, the output) in the kernel, the GELU's bias inside it; forced off,
    none, and the hidden states agree to float32 rounding."""
    model, params, ids = _tiny_bert()

    def forward():
        f = jax.jit(lambda p, i: model.apply({"params": p}, i)[0])
        return f(params, ids), f.lower(params, ids).as_text()

    with dispatch.rule_only():  # forced both ways: the rule keeps XLA's on builds without AVX2
        monkeypatch.setenv(dispatch.ROW_KERNELS_ENV, "fused_cpu")
        fused, text = forward()
        monkeypatch.setenv(dispatch.ROW_KERNELS_ENV, "xla")
        plain, plain_text = forward()
    assert len(re.findall(r"hw2jax_cpu_float32_dense", text)) == 6 * 2
    assert text.count("gelu = 1") == 2
    assert "hw2jax_cpu_float32_dense" not in plain_text
    np.testing.assert_allclose(fused, plain, atol=2e-5, rtol=0)


def test_the_probe_times_the_xla_path_as_the_program_compiles_it(monkeypatch):
    """Measure.compiler_options reach the probe's jit: a BERT product's XLA path is timed
    without YNNPACK, as BERT's float32 programs run it."""
    seen = []
    real_jit = jax.jit

    def spying_jit(fn, **kwargs):
        seen.append(kwargs.get("compiler_options"))
        return real_jit(fn, **kwargs)

    monkeypatch.setattr(jax, "jit", spying_jit)
    x = jax.ShapeDtypeStruct((2, 8, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((32, 16), jnp.float32)
    measure = bert.float32_product_paths(x, w)
    assert measure.size == "rows 2^4 32x16 float32"
    seen.clear()  # building the measure asked XLA whether it knows the options
    dispatch.time_paths(["xla"], measure, gradient=False)
    assert seen == [bert.xla_compiler_options(jnp.float32) or None]


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from hw2jax import kernels
mesh = Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((4, 40, 96)), jnp.float32)
w = jnp.asarray(rng.standard_normal((96, 64)), jnp.float32)
bias = jnp.asarray(rng.standard_normal(64), jnp.float32)
f = jax.jit(lambda x, w, b: kernels.float32_dense(x, w, b, gelu=True))
split = jax.device_put(x, NamedSharding(mesh, P("data")))
hlo = f.lower(split, w, bias).compile().as_text()
calls = sorted({l.split("=")[1].split("custom-call")[0].strip() for l in hlo.splitlines()
                if "float32_dense" in l and "custom-call(" in l})
print("all-gather" in hlo, ";".join(calls), bool(jnp.array_equal(f(x, w, bias), f(split, w, bias))))
"""


@needs_kernel
def test_on_a_mesh_each_device_multiplies_its_rows():
    """Rows split over 2 host devices: each runs the kernel on its 80 rows, no all-gather, and
    the result is the one device's, bit for bit (each row's sums are the same)."""
    gathered, calls, same = run_on_host_devices(_SHARDED).split()
    assert (gathered, calls, same) == ("False", "f32[80,64]{1,0}", "True")
