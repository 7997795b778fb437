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


def _shardings(mesh, layouts: tuple[str, ...], first: str, spec: PartitionSpec) -> tuple:
    """Shardings for `layouts` that keep the batch and heads axes of the first operand's
    `spec` (its layout `first`); every other axis whole."""
    axes = {a: s for a, s in zip(_AXES[first].split(), spec, strict=False) if a in "bh"}
    return tuple(
        NamedSharding(mesh, PartitionSpec(*(axes.get(a) for a in _AXES[layout].split())))
        for layout in layouts
    )


@functools.cache
def ffi_kernel(target: str, ins: tuple[str, ...], outs: tuple[str, ...], attrs: tuple = ()):
    """The FFI target as a function of its operands (layouts `ins`, results `outs`), with `attrs`
    ((name, value) pairs) fixed. Under ``jax.vmap`` the vmapped axes fold into the batch axis
    (one call); under ``jax.jit`` on a mesh, batch- or head-sharded operands stay sharded and
    the kernel runs on each device's slice."""

    def ffi(*args):
        sizes = _sizes(ins, args)
        results = tuple(
            jax.ShapeDtypeStruct(tuple(sizes[a] for a in _AXES[layout].split()), jnp.float32)
            for layout in outs
        )
        call = jax.ffi.ffi_call(target, results, vmap_method="broadcast_all")
        return call(*args, **dict(attrs))

    sharded = custom_partitioning(ffi)

    def partition(mesh, arg_shapes, result_shape):
        spec = arg_shapes[0].sharding.spec
        return mesh, ffi, _shardings(mesh, outs, ins[0], spec), _shardings(mesh, ins, ins[0], spec)

    def infer(mesh, arg_shapes, result_shape):
        return _shardings(mesh, outs, ins[0], arg_shapes[0].sharding.spec)

    letters = [a for layout in ins + outs for a in _AXES[layout].split()]
    sharded.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        sharding_rule=", ".join(_AXES[a] for a in ins) + " -> " + ", ".join(_AXES[a] for a in outs),
        # Every factor but batch and heads, in order of appearance (Shardy).
        need_replication_factors=tuple(a for a in dict.fromkeys(letters) if a not in "bh"),
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
