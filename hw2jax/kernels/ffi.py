"""The kernels' FFI targets as jax functions: one call per (target, layouts, attributes) that
works under ``jax.vmap`` (vmapped axes fold into the batch) and under ``jax.jit`` on a mesh (a
batch- or head-sharded input stays sharded: the kernel runs on each device's slice)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

# The layouts of the kernels' operands and results: batch first, heads the only other axis a
# mesh may split (sequences and heads are independent; positions and features stay whole).
_AXES = {
    "bthd": "b t h d",
    "bht": "b h t",
    "bth": "b t h",
    "bt": "b t",
    "bhdd": "b h d e",  # a [D, D] state per (sequence, head)
    "bhd": "b h d",
}


def _result_shape(layout: str, bthd: tuple[int, ...]) -> tuple[int, ...]:
    b, t, h, d = bthd
    shapes = {"bthd": (b, t, h, d), "bht": (b, h, t), "bth": (b, t, h)}
    return {**shapes, "bhdd": (b, h, d, d), "bhd": (b, h, d)}[layout]


def _shardings(mesh, layouts: tuple[str, ...], spec: PartitionSpec) -> tuple:
    """Shardings for `layouts` that keep the batch and heads axes of a [B, T, heads, D] spec."""
    batch = spec[0] if len(spec) > 0 else None
    heads = spec[2] if len(spec) > 2 else None
    axes = {"b": batch, "h": heads}
    return tuple(
        NamedSharding(mesh, PartitionSpec(*(axes.get(a) for a in layout))) for layout in layouts
    )


@functools.cache
def ffi_kernel(target: str, ins: tuple[str, ...], outs: tuple[str, ...], attrs: tuple = ()):
    """The FFI target as a function of its operands (the first [B, T, heads, D]), with `attrs`
    ((name, value) pairs) fixed. Under ``jax.vmap`` the vmapped axes fold into the batch axis
    (one call); under ``jax.jit`` on a mesh, batch- or head-sharded operands stay sharded and
    the kernel runs on each device's slice."""

    def ffi(*args):
        results = tuple(
            jax.ShapeDtypeStruct(_result_shape(layout, args[0].shape), jnp.float32)
            for layout in outs
        )
        call = jax.ffi.ffi_call(target, results, vmap_method="broadcast_all")
        return call(*args, **dict(attrs))

    sharded = custom_partitioning(ffi)

    def partition(mesh, arg_shapes, result_shape):
        spec = arg_shapes[0].sharding.spec
        return mesh, ffi, _shardings(mesh, outs, spec), _shardings(mesh, ins, spec)

    def infer(mesh, arg_shapes, result_shape):
        return _shardings(mesh, outs, arg_shapes[0].sharding.spec)

    sharded.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        sharding_rule=", ".join(_AXES[a] for a in ins) + " -> " + ", ".join(_AXES[a] for a in outs),
        # Every factor but batch and heads, in order of appearance (Shardy).
        need_replication_factors=tuple(
            f for f in "tde" if any(f in _AXES[a].split() for a in ins + outs)
        ),
    )

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
