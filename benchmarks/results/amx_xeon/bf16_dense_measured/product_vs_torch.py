"""Our bf16 product kernel (``kernels.amx_matmul``, bf16 out) against torch's bf16 matmul
(oneDNN) in one process, turn by turn, median of the rounds; each timed call follows two untimed
ones. Run with the malloc settings (``hw2jax.malloc.TUNABLES`` in GLIBC_TUNABLES): a fresh 50 MB
output a call otherwise spends its time in page faults.

    .venv/bin/python benchmarks/results/amx_xeon/bf16_dense_measured/product_vs_torch.py [rounds]
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from hw2jax import kernels

SHAPES = [(8192, 384, 384), (8192, 384, 1536), (8192, 1536, 384), (6400, 64, 128), (6400, 128, 64)]


def seconds(fn) -> float:
    for _ in range(2):
        fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(rounds: int) -> None:
    torch.set_num_threads(2)
    calls = {}
    for m, k, n in SHAPES:
        a = jax.random.normal(jax.random.key(0), (m, k)).astype(jnp.bfloat16)
        b = jax.random.normal(jax.random.key(1), (k, n)).astype(jnp.bfloat16)
        ours = jax.jit(lambda a, b: kernels.amx_matmul(a, b, out_dtype=jnp.bfloat16))
        ta, tb = (torch.tensor(np.asarray(x, np.float32)).bfloat16() for x in (a, b))
        calls[(m, k, n)] = (
            lambda ours=ours, a=a, b=b: ours(a, b).block_until_ready(),
            lambda ta=ta, tb=tb: torch.mm(ta, tb),
        )
    times = {shape: ([], []) for shape in SHAPES}
    for _ in range(rounds):
        for shape, (ours, theirs) in calls.items():
            times[shape][0].append(seconds(ours))
            times[shape][1].append(seconds(theirs))
    for shape, (ours, theirs) in times.items():
        o, t = np.median(ours) * 1e3, np.median(theirs) * 1e3
        tflops = 2 * np.prod(shape) / o / 1e9
        print(f"{shape}  ours {o:.3f} ms ({tflops:.2f} TFLOP/s)  torch {t:.3f} ms  {o / t:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
