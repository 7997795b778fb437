"""The layer-norm kernel: forward and gradients against a float64 loop, flax's LayerNorm (the
XLA path) with the same parameters, the residual sum added in its pass, a 2-device mesh, its
refusals and the dispatch rule; and the bias + GELU kernel, its row-kernel sibling, against
float64."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gelu64, gelu_slope64, run_on_host_devices

from hw2jax import kernels
from hw2jax.attention import dispatch
from hw2jax.errors import InputError
from hw2jax.models.layers import LayerNorm

pytestmark = pytest.mark.skipif(
    kernels.build_error() is not None, reason=f"no fused CPU kernels: {kernels.build_error()}"
)
AVX512 = dispatch.Machine("cpu", kernel_features=(("avx512f", True),))
AVX2 = dispatch.Machine("cpu", kernel_features=(("avx512f", False),))


def reference64(x, scale, bias, dy, eps):
    """y and the gradients of <y, dy>, one row at a time in float64."""
    x, scale, bias, dy = (np.asarray(a, np.float64) for a in (x, scale, bias, dy))
    rows, c = x.reshape(-1, x.shape[-1]), x.shape[-1]
    y, dx = np.zeros_like(rows), np.zeros_like(rows)
    dscale, dbias = np.zeros(c), np.zeros(c)
    for r, (row, d) in enumerate(zip(rows, dy.reshape(-1, c), strict=True)):
        mean = row.sum() / c
        rstd = 1.0 / np.sqrt(((row - mean) ** 2).sum() / c + eps)
        xhat = (row - mean) * rstd
        y[r] = xhat * scale + bias
        g = d * scale
        dx[r] = rstd * (g - g.mean() - xhat * (g * xhat).mean())
        dscale += d * xhat
        dbias += d
    return y.reshape(x.shape), dx.reshape(x.shape), dscale, dbias


def inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = (3 * rng.standard_normal(shape) + 1).astype(np.float32)
    scale, bias = (rng.standard_normal(c).astype(np.float32) for _ in range(2))
    return x, scale, bias, rng.standard_normal(shape).astype(np.float32)


def spread(params):
    """Parameters moved off flax's init (scale 1, bias 0) by distinct values, in their dtype."""
    return jax.tree.map(
        lambda p: p + jnp.linspace(-1, 1, p.size, dtype=p.dtype).reshape(p.shape), params
    )


# Rows in one item of 64 and across several, BERT's width, one vector, no rows at all. An
# epsilon near the rows' variance (9) as well: at 1e-5 a kernel that ignored it would pass.
@pytest.mark.parametrize("eps", [1e-5, 4.0])
@pytest.mark.parametrize("shape", [(3, 5, 64), (130, 384), (1, 16), (2, 70, 48), (0, 32)])
def test_forward_and_gradients_match_float64(shape, eps):
    x, scale, bias, dy = inputs(shape, seed=sum(shape))
    y, pullback = jax.vjp(
        lambda *a: kernels.cpu_layer_norm(*a, eps), *(jnp.asarray(a) for a in (x, scale, bias))
    )
    got = (y, *pullback(jnp.asarray(dy)))
    want = reference64(x, scale, bias, dy, eps)
    for name, a, w in zip(("y", "dx", "dscale", "dbias"), got, want, strict=True):
        np.testing.assert_allclose(a, w, atol=1e-5 * max(1, shape[0]), rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("path", ["fused_cpu", "xla"])
def test_the_module_is_flax_layer_norm_both_ways(monkeypatch, path):
    """Same parameters as flax.linen.LayerNorm, and the same function by either path."""
    monkeypatch.setenv("HW2JAX_ROW_KERNELS", path)
    x, _, _, dy = inputs((4, 50, 64), seed=1)
    ours, flax_norm = LayerNorm(epsilon=1e-5), nn.LayerNorm(epsilon=1e-5)
    params = flax_norm.init(jax.random.key(0), x)
    params = spread(params)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(params)

    def grads(module):
        def loss(p, x):
            return jnp.sum(module.apply(p, x) * dy)

        return jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))

    for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(flax_norm)), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(ours.apply(params, x), flax_norm.apply(params, x), atol=2e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"use_scale": False},
        {"use_bias": False},
        {"use_scale": False, "use_bias": False},
        {"reduction_axes": (-2, -1)},
        {"feature_axes": (-2, -1)},
        {"param_dtype": jnp.bfloat16},
    ],
    ids=["no scale", "no bias", "neither", "over two axes", "scales per two axes", "bf16 params"],
)
def test_options_the_kernel_lacks_are_flax_layer_norms_own(monkeypatch, options):
    """A drop-in for flax's LayerNorm: with the kernel asked for, every option it does not
    take (no scale or no bias, other axes, bf16 parameters) gives flax's own parameters and
    function, not the kernel's."""
    monkeypatch.setenv("HW2JAX_ROW_KERNELS", "fused_cpu")
    x = jnp.asarray(inputs((4, 6, 32), seed=2)[0])
    ours, flax_norm = LayerNorm(**options), nn.LayerNorm(**options)
    params = flax_norm.init(jax.random.key(0), x)
    params = spread(params)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(params)
    program = jax.jit(ours.apply).lower(params, x).as_text()
    assert "hw2jax_cpu" not in program, options
    np.testing.assert_array_equal(ours.apply(params, x), flax_norm.apply(params, x))


# Rows in one item and several, BERT's width, no rows.
@pytest.mark.parametrize("eps", [1e-5, 4.0])
@pytest.mark.parametrize("shape", [(3, 5, 64), (2, 130, 384), (0, 32)])
def test_the_residual_sum_joins_the_pass_with_xla_floats(shape, eps):
    """LN(x + (h + h_bias)) against float64, the same floats as XLA's sum before the kernel,
    and, differentiated, the same gradients as that sum's."""
    x, scale, bias, dy = inputs(shape, seed=sum(shape))
    h, _, h_bias, _ = inputs(shape, seed=sum(shape) + 1)
    args = tuple(jnp.asarray(a) for a in (x, h, h_bias, scale, bias))

    def fused(x, h, h_bias, scale, bias):
        return kernels.cpu_add_layer_norm(x, h, h_bias, scale, bias, eps)

    def unfused(x, h, h_bias, scale, bias):
        return kernels.cpu_layer_norm(x + (h + h_bias), scale, bias, eps)

    y = jax.jit(fused)(*args)
    np.testing.assert_array_equal(y, jax.jit(unfused)(*args))
    want = reference64(x.astype(np.float64) + h + h_bias, scale, bias, dy, eps)[0]
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
    grads = [jax.vjp(f, *args)[1](jnp.asarray(dy)) for f in (fused, unfused)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("path", ["fused_cpu", "xla"])
def test_the_module_adds_a_layers_product_and_bias_before_the_norm(monkeypatch, path):
    monkeypatch.setenv("HW2JAX_ROW_KERNELS", path)
    x, _, h_bias, h = inputs((4, 50, 64), seed=3)
    norm = LayerNorm(epsilon=1e-5)
    params = nn.LayerNorm(epsilon=1e-5).init(jax.random.key(0), x)
    params = spread(params)
    got = norm.apply(params, x, plus=(h, h_bias))
    np.testing.assert_array_equal(got, norm.apply(params, x + (h + h_bias)))
    program = jax.jit(lambda p: norm.apply(p, x, plus=(h, h_bias))).lower(params).as_text()
    assert ("hw2jax_cpu_add_layer_norm_forward" in program) == (path == "fused_cpu")
    asked, ask = [], dispatch.row_kernel
    monkeypatch.setattr(dispatch, "row_kernel", lambda *a, **k: asked.append(k) or ask(*a, **k))
    norm.apply(params, x, plus=(h, h_bias))
    assert len(asked) == 1  # one dispatch question a call, whichever path it answers


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_out_is_flax_bf16_layer_norm(monkeypatch, x_dtype):
    """dtype=bfloat16 (BERT's and the ViT's bf16 compute): float32 statistics, the output
    rounded to bf16 as flax's, and the gradients through the float32 backward."""
    monkeypatch.setenv("HW2JAX_ROW_KERNELS", "fused_cpu")
    x, _, _, dy = inputs((4, 50, 64), seed=2)
    x = jnp.asarray(x, x_dtype)
    ours = LayerNorm(epsilon=1e-5, dtype=jnp.bfloat16)
    flax_norm = nn.LayerNorm(epsilon=1e-5, dtype=jnp.bfloat16)
    params = flax_norm.init(jax.random.key(0), x)
    y, want = ours.apply(params, x), flax_norm.apply(params, x)
    assert y.dtype == want.dtype == jnp.bfloat16
    # One bf16 rounding step apart at most (the variance is summed in another order).
    np.testing.assert_allclose(np.float32(y), np.float32(want), rtol=2**-7, atol=1e-6)
    grads = [
        jax.grad(lambda p, x, m=m: jnp.sum(m.apply(p, x).astype(jnp.float32) * dy))(params, x)
        for m in (ours, flax_norm)
    ]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3, rtol=1e-3)


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from hw2jax import kernels
rng = np.random.default_rng(0)
x, dy = (rng.standard_normal((6, 40, 32)).astype(np.float32) for _ in range(2))
scale, bias = (rng.standard_normal(32).astype(np.float32) for _ in range(2))
loss = lambda x, s, b: jnp.sum(kernels.cpu_layer_norm(x, s, b, 1e-5) * dy)
f = jax.jit(jax.grad(loss, (0, 1, 2)))
one_device = f(x, scale, bias)
mesh = Mesh(np.array(jax.devices()), ("data",))
args = [jax.device_put(x, NamedSharding(mesh, P("data")))]
args += [jax.device_put(a, NamedSharding(mesh, P())) for a in (scale, bias)]
hlo = f.lower(*args).compile().as_text()
calls = [line.split("=")[1].split("custom-call")[0].strip()
         for line in hlo.splitlines() if "layer_norm" in line and "custom-call(" in line]
print("all-gather" in hlo, "all-reduce" in hlo)
print(sorted(set(calls)))
print(max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(f(*args), one_device)))
"""


def test_rows_split_over_devices_stay_split_and_the_scale_gradient_is_summed():
    stdout = run_on_host_devices(_SHARDED)
    collectives, calls, error = stdout.splitlines()
    assert collectives == "False True", stdout  # no all-gather; dscale, dbias summed
    assert "f32[120,32]" in calls and "f32[240," not in calls, calls
    assert float(error) < 1e-4


# One row and many, BERT's width, a 3-D input, no rows; values where erf bends and its tails.
@pytest.mark.parametrize("shape", [(1, 16), (130, 1536), (2, 7, 48), (0, 32)])
def test_bias_gelu_matches_the_float64_erf_formula_with_gradients(shape):
    x, _, bias, dy = inputs(shape, seed=sum(shape))
    y, pullback = jax.vjp(kernels.cpu_bias_gelu, jnp.asarray(x), jnp.asarray(bias))
    z = x.astype(np.float64) + bias
    np.testing.assert_allclose(y, gelu64(z), atol=2e-6, rtol=2e-6)
    slope = gelu_slope64(z)
    dx, dbias = pullback(jnp.asarray(dy))
    np.testing.assert_allclose(dx, dy * slope, atol=2e-6, rtol=2e-5)
    rows = (dy * slope).reshape(-1, shape[-1])
    np.testing.assert_allclose(dbias, rows.sum(0), atol=2e-6 * max(1, len(rows)), rtol=2e-5)


def test_inputs_it_cannot_take_are_refused_naming_the_alternative():
    ones = jnp.ones
    for x, message in (
        (ones((4, 64), jnp.bfloat16), "it takes float32; got bfloat16"),
        (ones((4, 50)), r"the last axis must be a positive multiple of 16; got shape \(4, 50\)"),
    ):
        with pytest.raises(InputError, match=f"cpu_layer_norm: {message}.*flax.linen.LayerNorm"):
            kernels.cpu_layer_norm(x, ones(x.shape[-1]), ones(x.shape[-1]), 1e-5)
    with pytest.raises(InputError, match=r"scale and bias of shape \(64,\); got \(32,\)"):
        kernels.cpu_layer_norm(ones((4, 64)), ones(32), ones(64), 1e-5)
    # Only the last axis counts; a width of 0 and a scalar are refused.
    from hw2jax.kernels.rows import layer_norm_unsupported

    assert layer_norm_unsupported((2, 3, 5, 32), jnp.float32) is None
    for shape in ((4, 0), ()):
        assert "positive multiple of 16" in layer_norm_unsupported(shape, jnp.float32)
    with pytest.raises(InputError, match=r"h of x's shape \(4, 64\), float32; got \(4, 32\)"):
        kernels.cpu_add_layer_norm(ones((4, 64)), ones((4, 32)), ones(64), ones(64), ones(64), 0)
    with pytest.raises(InputError, match=r"h_bias, scale and bias of shape \(64,\); got \(32,\)"):
        kernels.cpu_add_layer_norm(ones((4, 64)), ones((4, 64)), ones(32), ones(64), ones(64), 0)


def test_the_rule_and_its_environment_variable(monkeypatch):
    def never():
        raise AssertionError("asked about the kernel where the rule cannot take it")

    assert dispatch.row_kernel(lambda: None, AVX512) == "fused_cpu"
    assert dispatch.row_kernel(lambda: "bfloat16", AVX512) == "xla"
    assert dispatch.row_kernel(never, AVX2) == "xla"
    assert dispatch.row_kernel(never, dispatch.Machine("gpu")) == "xla"
    monkeypatch.setenv("HW2JAX_ROW_KERNELS", "xla")
    assert dispatch.row_kernel(never, AVX512) == "xla"
    monkeypatch.setenv("HW2JAX_ROW_KERNELS", "fused_cpu")
    assert dispatch.row_kernel(lambda: None, AVX2) == "fused_cpu"
    monkeypatch.setenv("HW2JAX_ROW_KERNELS", "fast")
    with pytest.raises(dispatch.ImplementationError, match="HW2JAX_ROW_KERNELS; use one of auto"):
        dispatch.row_kernel(lambda: None, AVX512)
