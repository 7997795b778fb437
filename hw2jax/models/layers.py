"""Layers shared by the models."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hw2jax import kernels
from hw2jax.attention import dispatch


def init_on_dummy(model: nn.Module, key: jax.Array, dummy: jax.Array) -> dict:
    """``model.init(key, dummy)["params"]``, with attention's ``auto`` taking the feature rule
    and timing nothing: a dummy batch of one is a shape class that training never runs, and
    params do not depend on the path taken."""
    with dispatch.rule_only():
        return model.init(key, dummy)["params"]


def torch_uniform(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


NO_YNNPACK = (("xla_cpu_experimental_ynn_fusion_type", ""),)  # XLA's own loops and dots


@functools.cache
def xla_accepts(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib knows the options: experimental XLA flags come and go between
    releases, and an unknown one would fail every compilation that names it."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(1.0).compile()
    except Exception:  # jaxlib raises its own runtime error type for unknown options
        return False
    return True


def bf16_step_options(dtype, machine: dispatch.Machine | None = None) -> dict[str, str]:
    """XLA options for a step whose compute is ``dtype``: with bf16 products on AMX tiles,
    XLA's own loops (YNNPACK off) for what is left (:func:`hw2jax.models.vit.
    xla_compiler_options` gives the measurements); else none."""
    if dtype is None or jnp.dtype(dtype) != jnp.bfloat16 or jax.default_backend() != "cpu":
        return {}
    if not dispatch.bf16_products_on_amx(kernels.amx_matmul_unavailable_reason, machine):
        return {}
    return dict(NO_YNNPACK) if xla_accepts(NO_YNNPACK) else {}


def bf16_product_paths(
    x: jax.Array, kernel: jax.Array, compiler_options: dict[str, str]
) -> dispatch.Measure:
    """What auto times for a bf16 dense layer's ``x @ kernel`` (float32 out) with gradients, in
    a program compiled with ``compiler_options``: the product kernel (:func:`hw2jax.kernels.
    amx_matmul`) or XLA's dot with :func:`dense_dot`'s backward, each with its output and both
    gradients."""
    rows, (k, n) = math.prod(x.shape[:-1]), kernel.shape
    probe_rows = min(rows, dispatch.PROBE_ROWS)
    paths = {"amx": kernels.amx_matmul, "xla": xla_dot}  # not dense_dot, which would ask again
    options = tuple(sorted(compiler_options.items()))
    bf16 = jnp.bfloat16
    return dispatch.Measure(
        (jax.ShapeDtypeStruct(x.shape, bf16), jax.ShapeDtypeStruct(kernel.shape, bf16)),
        paths.__getitem__,
        size=_bf16_class(rows, k, n, options),
        probe=(
            jax.ShapeDtypeStruct((probe_rows, k), bf16),
            jax.ShapeDtypeStruct((k, n), bf16),
            jax.ShapeDtypeStruct((probe_rows, n), jnp.float32),
        ),
        compiler_options=options,
        cotangent=True,
    )


def bf16_layer_paths(
    args: Sequence[jax.Array],
    forms: Mapping[str, Callable],
    layer: str,
    compiler_options: dict[str, str],
) -> dispatch.Measure:
    """What auto times for a bf16 dense layer forward, in a program compiled with
    ``compiler_options``: its ``forms`` as the layer runs them, functions of ``args`` (x, then
    the kernel [K, N], then any others), on at most :data:`hw2jax.attention.dispatch.
    PROBE_ROWS` rows of x. ``layer`` names what the forms compute beyond the product (the
    class's tail)."""
    x, kernel = args[0], args[1]
    rows, (k, n) = math.prod(x.shape[:-1]), kernel.shape
    probe_x = jax.ShapeDtypeStruct((min(rows, dispatch.PROBE_ROWS), k), x.dtype)
    options = tuple(sorted(compiler_options.items()))
    return dispatch.Measure(
        tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args),
        forms.__getitem__,
        size=_bf16_class(rows, k, n, options) + (f", {layer}" if layer else ""),
        probe=(probe_x, *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args[1:])),
        compiler_options=options,
    )


def _bf16_class(rows: int, k: int, n: int, options: tuple[tuple[str, str], ...]) -> str:
    """A bf16 dense class's size: rows to a power of two, K x N, and the program's XLA options
    (sorted pairs)."""
    where = {(): "", tuple(sorted(NO_YNNPACK)): " YNNPACK off"}.get(options, f" options {options}")
    return f"rows 2^{int(math.log2(max(rows, 1)))} {k}x{n} bfloat16{where}"


def measured_dense(
    forms: Mapping[str, Callable],
    args: Sequence[jax.Array],
    rhs: jax.Array,
    step_options: Callable[[Any], dict[str, str]],
    layer: str = "",
) -> jax.Array:
    """A dense layer's output, computed by one of ``forms``: ``"amx"`` on the product kernel,
    ``"xla"`` by XLA's dot, each a function of ``args`` (x first, then the kernel as the form
    takes it). ``rhs`` is the kernel in x's dtype: the product ``x @ rhs`` decides, by
    :func:`hw2jax.attention.dispatch.dense_product`. Forward, the forms are timed as they run
    (:func:`bf16_layer_paths`; ``layer`` names what they add to the product); under
    differentiation the product alone, with its output and both gradients
    (:func:`bf16_product_paths`). Each is decided as the program traces it, so that a program
    times only its own class: forward for a frozen encoder's features or an evaluation, with
    gradients for a training step. On pair dot products one path may win each
    (benchmarks/results/amx_xeon/no_amx_refused/bf16_forward_class/). ``step_options(bf16)``:
    the XLA options of the programs it runs in."""
    lhs = args[0]
    dims = _dense_dims(lhs.ndim)

    def path(gradient: bool) -> str:
        def measure():
            options = step_options(jnp.bfloat16)
            if gradient:
                return bf16_product_paths(lhs, rhs, options)
            return bf16_layer_paths(args, forms, layer, options)

        reason = kernels.bf16_products_unavailable_reason
        return dispatch.dense_product(lhs, rhs, dims, reason, measure=measure, gradient=gradient)

    rule = dispatch.dense_product(lhs, rhs, dims, kernels.bf16_products_unavailable_reason)
    if rule != "amx":  # nothing to time
        return forms[rule](*args)
    return kernels.differentiated_by(
        lambda *inputs: forms[path(False)](*inputs), lambda *inputs: forms[path(True)](*inputs)
    )(*args)


def dot_float32_out(
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    step_options: Callable[[Any], dict[str, str]] = bf16_step_options,
):
    """A dot_general for nn.Dense that accumulates and returns float32 whatever the input
    dtype: with bf16 inputs this is both the accurate choice and, on CPUs with AVX512-BF16,
    the fast one (benchmarks/NOTES.md). bf16 products run on the product kernel where
    :func:`measured_dense` says so, timed in a program compiled with ``step_options(bf16)``, the
    XLA options of the model's steps (the ViT's by default)."""
    del preferred_element_type
    if (
        lhs.dtype == rhs.dtype
        and lhs.dtype in _DENSE_DTYPES
        and dimension_numbers == _dense_dims(lhs.ndim)
    ):
        forms = {"amx": kernels.amx_matmul, "xla": lambda x, w: xla_dot(x, w, precision)}
        return measured_dense(forms, (lhs, rhs), rhs, step_options)
    return jax.lax.dot_general(
        lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32
    )


def dense_dot(
    x: jax.Array,
    kernel: jax.Array,
    step_options: Callable[[Any], dict[str, str]] = bf16_step_options,
) -> jax.Array:
    """x @ kernel over x's last axis, float32 out, as nn.Dense with :func:`dot_float32_out`
    computes it (and with its backward)."""
    return dot_float32_out(x, kernel, _dense_dims(x.ndim), step_options=step_options)


_DENSE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _dense_dims(ndim: int):
    return (((ndim - 1,), (0,)), ((), ()))


def _product(a, b, dims, precision):
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def xla_dot(x: jax.Array, w: jax.Array, precision=None) -> jax.Array:
    """x [..., c] @ w [c, k], float32 or bf16 in, float32 out, with a backward of our own:
    - the weight gradient transposes the narrower of x and the output gradient g. JAX's rule
      computes it as g^T x, so XLA's CPU dot copies g [rows, k] into [k, rows] first: where
      k > c (the ViT's regrouped attention, k = 4c) that copy alone took ~11 ms a layer on 128
      images, more than the product;
    - with bf16 inputs, both gradient products take g rounded to bf16 (as torch's autocast and
      our AMX kernel do), where JAX's rule upcasts x and w and multiplies in float32.
    (benchmarks/NOTES.md.)"""
    return _product(x, w, _dense_dims(x.ndim), precision)


def _xla_dot_fwd(x, w, precision):
    return xla_dot(x, w, precision), (x, w)


def _xla_dot_bwd(precision, residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    dx = _product(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision)
    lead = tuple(range(x.ndim - 1))
    if x.shape[-1] <= g.shape[-1]:  # x^T g: XLA transposes x
        dw = _product(x, g, ((lead, lead), ((), ())), precision)
    else:  # (g^T x)^T: XLA transposes g. The barrier keeps it from folding the final
        # transpose into the dot by swapping its operands: XLA's CPU runtime multiplies bf16
        # only through YNNPACK, which wants the lhs contracted on its last axis.
        dw = jax.lax.optimization_barrier(_product(g, x, ((lead, lead), ((), ())), precision)).T
    return dx.astype(x.dtype), dw.astype(w.dtype)


xla_dot.defvjp(_xla_dot_fwd, _xla_dot_bwd)


class LayerNorm(nn.LayerNorm):
    """flax's LayerNorm (same parameters), computed by :func:`hw2jax.kernels.cpu_layer_norm`
    where :func:`hw2jax.attention.dispatch.row_kernel` says so: over the last axis, C a
    multiple of 16, in float32 (bf16 input upcast) and returned as ``dtype`` (float32 or bf16,
    as flax's returns it), on a CPU where the fused kernels pay off. Elsewhere flax's own.

    ``plus=(h, h_bias)``, a layer's product and its bias, normalises ``x + (h + h_bias)``, a
    post-norm residual: in float32 the kernel adds them in its own pass over the rows
    (:func:`hw2jax.kernels.cpu_add_layer_norm`, the same floats), where XLA would add them in a
    pass of their own."""

    @nn.compact
    def __call__(self, x, *, mask=None, plus: tuple[jax.Array, jax.Array] | None = None):
        if plus is not None:
            h, h_bias = plus
            # One dispatch question, about the sum the kernel or XLA normalises.
            total = jax.ShapeDtypeStruct(x.shape, jnp.result_type(x, h, h_bias))
            takes = mask is None and self._kernel_takes(total)
            f32 = jnp.dtype(jnp.float32)
            if takes and {x.dtype, h.dtype, h_bias.dtype, jnp.dtype(self.dtype or x.dtype)} == {
                f32
            }:
                scale, bias = self._scale_and_bias(x.shape[-1])
                return kernels.cpu_add_layer_norm(x, h, h_bias, scale, bias, self.epsilon)
            x = x + (h + h_bias)
        else:
            takes = mask is None and self._kernel_takes(x)
        if takes:
            scale, bias = self._scale_and_bias(x.shape[-1])
            out = self.dtype or x.dtype  # as flax's: the input's dtype unless one is given
            return kernels.cpu_layer_norm(x.astype(jnp.float32), scale, bias, self.epsilon, out)
        return super().__call__(x, mask=mask)

    def _scale_and_bias(self, c: int) -> tuple[jax.Array, jax.Array]:
        """The parameters flax's LayerNorm declares, under its names."""
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        return scale, self.param("bias", self.bias_init, (c,), self.param_dtype)

    def _kernel_takes(self, x) -> bool:
        plain = (
            self.reduction_axes == -1
            and self.feature_axes == -1
            and self.use_bias
            and self.use_scale
            and self.axis_name is None
            and x.dtype in (jnp.float32, jnp.bfloat16)
            and jnp.dtype(self.dtype or x.dtype) in (jnp.float32, jnp.bfloat16)
            and jnp.dtype(self.param_dtype) == jnp.float32
        )
        # The kernel takes x upcast to float32.
        why_not = functools.partial(kernels.row_kernel_unavailable_reason, x.shape, jnp.float32)
        # Timed with gradients: training is where layer norms' time goes.
        return plain and (
            dispatch.row_kernel(why_not, measure=self._paths(x), op="layer_norm", gradient=True)
            == "fused_cpu"
        )

    def _paths(self, x) -> dispatch.Measure:
        """What auto times for x's shape and dtype: the kernel, or flax's LayerNorm with this
        one's settings."""
        out, eps = self.dtype or x.dtype, self.epsilon
        flax_norm = nn.LayerNorm(epsilon=eps, dtype=self.dtype, parent=None)

        def run(path: str):
            if path == "fused_cpu":
                return lambda x, s, b: kernels.cpu_layer_norm(x.astype(jnp.float32), s, b, eps, out)
            return lambda x, s, b: flax_norm.apply({"params": {"scale": s, "bias": b}}, x)

        vector = jax.ShapeDtypeStruct(x.shape[-1:], self.param_dtype)
        return dispatch.Measure((jax.ShapeDtypeStruct(x.shape, x.dtype), vector, vector), run)


def TorchDense(
    features: int, fan_in: int, use_bias: bool = True, dtype=None, name: str | None = None
) -> nn.Dense:
    """nn.Dense initialised like torch.nn.Linear, so training starts where the reference did."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=torch_uniform(fan_in),
        bias_init=torch_uniform(fan_in),
        dtype=dtype,
        name=name,
        dot_general=dot_float32_out,
    )


class TorchKernel(nn.Module):
    """The parameters of a :func:`TorchDense` (same tree, same init) without the product, for
    layers that slice or combine the kernel before use: the kernel, or (kernel, bias)."""

    features: int
    fan_in: int
    use_bias: bool = False

    @nn.compact
    def __call__(self):
        init = torch_uniform(self.fan_in)
        kernel = self.param("kernel", init, (self.fan_in, self.features))
        if not self.use_bias:
            return kernel
        return kernel, self.param("bias", init, (self.features,))
