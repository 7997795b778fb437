"""Data parallelism with jax.sharding: params replicated, each batch split over devices.

jit follows the shardings of its inputs, so the same train and eval steps run on one device
or on a mesh; XLA inserts the gradient all-reduce. Multi-host runs call
``jax.distributed.initialize()`` first (see README), after which ``jax.devices()`` spans
every host.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def num_devices(spec: str | int) -> int:
    """``"all"``, or a count no larger than ``jax.device_count()``."""
    available = jax.device_count()
    if str(spec) == "all":
        return available
    try:
        n = int(spec)
    except ValueError:
        raise ValueError(f"devices must be 'all' or a number, got {spec!r}.") from None
    if not 1 <= n <= available:
        raise ValueError(
            f"devices={n}, but this process sees {available} device(s); on CPU, test with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n}."
        )
    return n


class DataParallel:
    def __init__(self, devices: str | int = 1, *batch_sizes: int):
        """``batch_sizes`` (train, eval, ...) must split evenly over the devices."""
        self.n = num_devices(devices)
        self.mesh = Mesh(np.array(jax.devices()[: self.n]), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.split = NamedSharding(self.mesh, PartitionSpec("data"))
        for size in batch_sizes:
            if size % self.n:
                raise ValueError(
                    f"batch size {size} does not split evenly over {self.n} devices; "
                    f"use a multiple of {self.n}."
                )

    def replicate(self, tree: Any) -> Any:
        return tree if self.n == 1 else jax.device_put(tree, self.replicated)

    def shard_batch(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return batch if self.n == 1 else jax.device_put(batch, self.split)
