"""Data parallelism with jax.sharding: params replicated, each batch split over devices.

jit follows the shardings of its inputs, so the same train and eval steps run on one device
or on a mesh; XLA inserts the gradient all-reduce. Multi-process runs (several hosts, or
several processes on one) call :func:`initialize_distributed` first, after which
``jax.devices()`` spans every process. Every process builds the same global batch (same
data, same seed), and hands jax only the rows of its own devices.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hw2jax.config import batch_split_problem
from hw2jax.errors import Hw2jaxError, InputError


def num_devices(spec: str | int) -> int:
    """``"all"``, or a count no larger than ``jax.device_count()``."""
    available = jax.device_count()
    if str(spec) == "all":
        return available
    try:
        n = int(spec)
    except ValueError:
        raise InputError(f"devices must be 'all' or a number, got {spec!r}.") from None
    if not 1 <= n <= available:
        raise InputError(
            f"devices={n}, but this process sees {available} device(s); on CPU, test with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n}."
        )
    return n


def check_batch_split(devices: int, batch_sizes: Sequence[int]) -> None:
    """Each batch size (train, eval) must split evenly over ``devices`` for data parallel."""
    if (problem := batch_split_problem(devices, batch_sizes)) is not None:
        raise InputError(f"{problem}.")


def auto_host_devices(cores: int, batch_sizes: Sequence[int]) -> int:
    """The most host devices, at most one per core, that every batch size splits evenly over
    (``--host-devices auto``): with batches of 256 and 1000, 2 cores give 2, 6 give 4, 12 give 8."""
    return max(n for n in range(1, max(cores, 1) + 1) if all(b % n == 0 for b in batch_sizes))


def split_host_cpu(n: int) -> None:
    """Show this process's CPU to jax as ``n`` devices, so that data parallel over them runs
    ``n`` slices of each batch at once. XLA CPU runs a small model's many small ops one at a
    time, leaving cores idle; host devices fill them (benchmarks/README.md).
    Must run before jax does any work (the device count is fixed when its backend starts)."""
    if n < 1:
        raise InputError(f"host devices must be at least 1, got {n}.")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        raise InputError(
            f"cannot split the CPU into {n} devices: jax has already started. Call "
            "split_host_cpu before any jax operation, or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting Python."
        ) from None
    if n > 1:  # the backend has not started, so it will read them
        add_collective_timeouts()


# XLA:CPU ends the whole process when one host device has waited a minute for another at a
# collective (a warning at 20 s, an abort 40 s later). Nothing need be wrong for that: a run
# at low priority beside other work (tests, a benchmark) is starved for longer, and a
# background ViT run died so. Host devices wait up to an hour, as long as the user's own
# XLA_FLAGS do not say otherwise.
PATIENT_COLLECTIVES = {
    "xla_cpu_collective_call_warn_stuck_timeout_seconds": 600,
    "xla_cpu_collective_call_terminate_timeout_seconds": 3600,
}


def add_collective_timeouts() -> None:
    """Adds :data:`PATIENT_COLLECTIVES` to ``$XLA_FLAGS`` (read when jax's backend starts)
    where the flags do not set them."""
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f"--{k}={v}" for k, v in PATIENT_COLLECTIVES.items() if f"--{k}=" not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """``jax.distributed.initialize`` with a clear error. With no arguments jax detects
    SLURM, Open MPI, Cloud TPU and GKE; elsewhere give all three (the coordinator may also
    come from $JAX_COORDINATOR_ADDRESS). On CPU, processes talk through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects CPU
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (ValueError, RuntimeError) as err:
        raise InputError(
            f"could not start the distributed runtime ({err}). Outside SLURM/MPI/TPU clusters "
            "pass --coordinator HOST:PORT --num-processes N --process-id I on every process."
        ) from None


class PeerLost(Hw2jaxError, RuntimeError):
    """Another process of a jax.distributed run died or stopped: its collectives failed."""


# What the collectives (gloo on CPU) and the coordination service say when a peer is gone.
_PEER_LOSS = ("Gloo", "Connection reset by peer", "Connection refused", "heartbeat timeout")


def peer_lost(error: BaseException, step: int) -> PeerLost | None:
    """A :class:`PeerLost` naming what failed, if ``error`` says that another process of this
    run is gone; None for any other error, or with one process."""
    text = str(error)
    if jax.process_count() < 2 or not any(sign in text for sign in _PEER_LOSS):
        return None
    first = next((line for line in text.splitlines() if any(s in line for s in _PEER_LOSS)), "")
    return PeerLost(
        f"process {jax.process_index()} of {jax.process_count()} lost contact with another "
        f"process at step {step} ({first.strip()[:200]}); it has died or was stopped. Start "
        "every process again with the same command: they resume from the last checkpoint."
    )


def is_main_process() -> bool:
    """Only process 0 writes logs, history and plots; checkpoints are written by all."""
    return jax.process_index() == 0


def _global_array(x: Any, sharding: NamedSharding) -> jax.Array:
    host = np.asarray(x)  # every process holds the same global value
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


class DataParallel:
    def __init__(self, devices: str | int = 1, *batch_sizes: int):
        """``batch_sizes`` (train, eval, ...) must split evenly over the devices."""
        self.n = num_devices(devices)
        self.mesh = Mesh(np.array(jax.devices()[: self.n]), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.split = NamedSharding(self.mesh, PartitionSpec("data"))
        check_batch_split(self.n, batch_sizes)

    def _put(self, tree: Any, sharding: NamedSharding) -> Any:
        if self.n == 1:
            return tree
        if jax.process_count() == 1:
            return jax.device_put(tree, sharding)
        return jax.tree.map(lambda x: _global_array(x, sharding), tree)

    def replicate(self, tree: Any) -> Any:
        return self._put(tree, self.replicated)

    def shard_batch(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return self._put(batch, self.split)
