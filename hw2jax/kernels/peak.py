"""The CPU's float32 peak as measured: independent multiply-add chains on XLA's threads.

"Achieved against peak" in the benchmarks needs the rate these cores reach at the clock they
actually run; :func:`hw2jax.cpu.peak_fp32_gflops` estimates it from the nominal clock, which a
hypervisor reports and boost exceeds (a 2-core Xeon with AMX: 333 estimated, 472-487 measured).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax import cpu
from hw2jax.kernels.build import TARGETS, KernelUnavailable, cpu_attention_unavailable_reason


def fma_chains(start, iterations: int, x: float, y: float) -> tuple[jax.Array, jax.Array]:
    """Runs ``a <- a * x + y`` ``iterations`` times from each value of ``start`` (float32 [items]),
    in many independent chains per item; returns each item's final ``a`` and the multiply-adds
    per item per iteration (a [1] array: chains x the lanes of the build's vectors). Raises
    :class:`KernelUnavailable` where the kernels cannot run here."""
    if (reason := cpu_attention_unavailable_reason(16, jnp.float32)) is not None:
        raise KernelUnavailable(reason)  # else: the kernels built and registered
    items = np.shape(start)[0]
    call = jax.ffi.ffi_call(
        TARGETS["fma_peak"][1],
        (jax.ShapeDtypeStruct((items,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)),
    )
    return call(
        jnp.asarray(start, jnp.float32),
        iterations=np.int64(iterations),
        x=np.float32(x),
        y=np.float32(y),
    )


def fma_peak_gflops(seconds: float = 0.25, repeats: int = 3) -> float | None:
    """The float32 GFLOP/s of the best of ``repeats`` runs of :func:`fma_chains` of about
    ``seconds`` each, 8 items per core (XLA's threads take them as they come); None off CPU or
    where the kernels are unavailable (their build error says why)."""
    if cpu_attention_unavailable_reason(16, jnp.float32) is not None:
        return None
    start = np.zeros(8 * cpu.usable_cores(), np.float32)
    run = jax.jit(fma_chains, static_argnums=(1, 2, 3))

    def timed(iterations: int) -> tuple[float, float]:
        begin = time.perf_counter()
        _, lanes = jax.block_until_ready(run(start, iterations, 0.999, 0.001))
        return time.perf_counter() - begin, float(lanes[0])

    iterations = 1000
    while True:  # the count is an attribute: each new one compiles on its first call
        timed(iterations)
        if (elapsed := timed(iterations)[0]) >= 0.01:  # long enough to scale from
            break
        iterations *= 8
    iterations = max(1, int(iterations * seconds / elapsed))
    timed(iterations)
    best = 0.0
    for _ in range(repeats):
        elapsed, lanes = timed(iterations)
        best = max(best, 2 * lanes * iterations * len(start) / elapsed / 1e9)
    return best
