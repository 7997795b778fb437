"""The kernels' FFI targets as jax functions: :func:`on_mesh`, the one partitioning rule every
kernel's call uses under ``jax.jit`` on a mesh (split inputs stay split, each device runs the
kernel on its own slices), :func:`ffi_kernel`, one call per (target, layouts, attributes)
for the attention kernels, whose vmapped axes fold into the batch, :func:`dense_on_rows`,
the dense layers' calls (bf16 and float32: a b, a bias, GELU), with
:func:`check_dense_bias`, and :func:`differentiated_by`, a kernel forward paired with another
form's gradient."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from hw2jax.errors import InputError

# The layouts of the kernels' operands and results: batch first, heads the only other axis a
# mesh may split (sequences and heads are independent; positions and features stay whole).
_AXES = {
    "bthd": "b t h d",
    "bht": "b h t",
    "bth": "b t h",
    "bt": "b t",
    "bh": "b h",  # one value per (sequence, head)
    "bhdd": "b h d e",  # a [D, D] state per (sequence, head)
    "bhd": "b h d",
    "hd": "h d",  # a vector per head (a projection's bias)
    "bqd": "b q d",  # rows of queries ...
    "bkd": "b k d",  # ... against a few keys
    "bqk": "b q k",
}


def _sizes(ins: tuple[str, ...], args) -> dict[str, int]:
    """Each axis letter's length, from the operands' layouts (e, a second D, is D)."""
    sizes = {}
    for layout, arg in zip(ins, args, strict=False):
        sizes.update(zip(_AXES[layout].split(), arg.shape, strict=True))
    return {"e": sizes.get("d"), **sizes}


def on_mesh(local, rule: str, split: str):
    """``local`` under ``jax.jit`` on a mesh, each device running it on its own slices.

    ``rule`` names each operand's and result's axes by letter, as Shardy's sharding rule does
    ("b t d, d e -> b t e, e"). Only the axes whose letters are in ``split`` may stay split over
    devices; each takes its mesh axes from the first operand that has it, and every other axis
    is whole on every device. A result that lacks a split axis is a sum over it (a weight
    gradient, summed over the batch rows), so each device's part is added over the devices
    that split it."""
    ins, outs = ([layout.split() for layout in side.split(", ")] for side in rule.split(" -> "))

    def split_axes(arg_shapes) -> dict:
        axes = {}
        for letters, shape in zip(ins, arg_shapes, strict=True):
            spec = shape.sharding.spec
            for i, letter in enumerate(letters):
                if letter in split and letter not in axes:
                    axes[letter] = spec[i] if i < len(spec) else None
        return axes

    def shardings(mesh, axes: dict, layouts) -> tuple:
        return tuple(
            NamedSharding(mesh, PartitionSpec(*(axes.get(a) for a in letters)))
            for letters in layouts
        )

    def summed_over(axes: dict, letters) -> tuple:
        missing = (axes[a] for a in axes if a not in letters and axes[a] is not None)
        return tuple(n for m in missing for n in ((m,) if isinstance(m, str) else m))

    def results(mesh, axes, result_shape):
        out = shardings(mesh, axes, outs)
        return out if isinstance(result_shape, (tuple, list)) else out[0]

    def infer(mesh, arg_shapes, result_shape):
        return results(mesh, split_axes(arg_shapes), result_shape)

    def partition(mesh, arg_shapes, result_shape):
        axes = split_axes(arg_shapes)
        sums = [summed_over(axes, letters) for letters in outs]
        on_device = local
        if any(sums):
            single = not isinstance(result_shape, (tuple, list))

            def on_device(*args):
                values = local(*args)
                values = (values,) if single else values
                values = tuple(
                    jax.lax.psum(v, s) if s else v for v, s in zip(values, sums, strict=True)
                )
                return values[0] if single else values

        return mesh, on_device, results(mesh, axes, result_shape), shardings(mesh, axes, ins)

    sharded = custom_partitioning(local)
    letters = dict.fromkeys(a for letters in ins + outs for a in letters)
    sharded.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        # Every factor that stays whole, in the order the rule first names them (Shardy).
        need_replication_factors=tuple(a for a in letters if a not in split),
    )
    return sharded


@functools.cache
def dense_on_rows(target: str, with_bias: bool, gelu: bool, out_dtype: str):
    """A dense layer's FFI target (``target``, its registered name) as a function of 2-D a
    [M, K], b [K, N] and, ``with_bias``, a float32 bias [N]: ``a . b`` (+ bias, then GELU
    where asked) as ``out_dtype`` [M, N]. On a mesh each device takes its own rows of a."""

    def local(a, b, *bias):
        call = jax.ffi.ffi_call(
            target,
            jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), out_dtype),
            vmap_method="sequential",
        )
        given = bias[0] if bias else jnp.zeros((0,), jnp.float32)
        return call(a, b, given, has_bias=np.int32(with_bias), gelu=np.int32(gelu))

    return on_mesh(local, "m k, k n, n -> m n" if with_bias else "m k, k n -> m n", split="m")


def check_dense_bias(name: str, kernel: jax.Array, bias: jax.Array | None, gelu: bool) -> None:
    """A dense call's bias: [N] for a kernel [K, N], and one wherever GELU is asked for."""
    if bias is not None and bias.shape != kernel.shape[1:]:
        raise InputError(f"{name} wants a bias of shape {kernel.shape[1:]}; got {bias.shape}.")
    if gelu and bias is None:
        raise InputError(f"{name} applies GELU after a bias: pass one (zeros for none).")


def differentiated_by(forward, differentiated):
    """A function that runs ``forward`` where nothing differentiates it and, under
    differentiation, ``differentiated`` (the same function computed another way) forward and
    backward: a kernel that keeps nothing for a backward pass, paired with a form that does.
    Integer inputs (seeds) get no cotangent."""

    @jax.custom_vjp
    def call(*args):
        return forward(*args)

    call.defvjp(lambda *args: jax.vjp(differentiated, *args), lambda pullback, g: pullback(g))
    return call


@functools.cache
def ffi_kernel(
    target: str, ins: tuple[str, ...], outs: tuple[str, ...], attrs: tuple = (), out_dtype="float32"
):
    """The FFI target as a function of its operands (layouts `ins`, results `outs`, each of
    ``out_dtype``), with `attrs` ((name, value) pairs) fixed. Under ``jax.vmap`` the vmapped
    axes fold into the batch axis (one call); under ``jax.jit`` on a mesh, batch- or
    head-sharded operands stay sharded and the kernel runs on each device's slice."""

    def ffi(*args):
        sizes = _sizes(ins, args)
        results = tuple(
            jax.ShapeDtypeStruct(tuple(sizes[a] for a in _AXES[layout].split()), out_dtype)
            for layout in outs
        )
        call = jax.ffi.ffi_call(target, results, vmap_method="broadcast_all")
        return call(*args, **dict(attrs))

    rule = ", ".join(_AXES[a] for a in ins) + " -> " + ", ".join(_AXES[a] for a in outs)
    sharded = on_mesh(ffi, rule, split="bh")

    @jax.custom_batching.custom_vmap
    def call(*args):
        return sharded(*args)

    @call.def_vmap
    def _fold(axis_size, in_batched, *args):
        args = [
            a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, b in zip(args, in_batched, strict=True)
        ]
        results = call(*(a.reshape(-1, *a.shape[2:]) for a in args))
        return tuple(r.reshape(axis_size, -1, *r.shape[1:]) for r in results), (True,) * len(outs)

    return call
