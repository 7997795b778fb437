"""One product timed right after another call, in turn, in several orders: the call after
torch's runs slower (torch's OpenMP threads spin on after their work).

    .venv/bin/python benchmarks/results/zen4/pair_dots/steady/after_torch.py
"""

import sys

sys.path.insert(0, "benchmarks")

import bf16_matmul as bm
import jax
import jax.numpy as jnp
import numpy as np
import torch

from hw2jax import kernels, malloc
from hw2jax.timing import interleaved_seconds


def main() -> None:
    m, k, n = 8192, 384, 384  # MiniLM's q/k/v product
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    ta, tb, tg = (torch.from_numpy(np.array(x, np.float32)).bfloat16() for x in (a, b, g))
    kernel, xla = (bm.product_call(p, g, False) for p in (kernels.amx_matmul, bm.xla_product))
    calls = {
        "kernel": lambda: jax.block_until_ready(kernel(a, b)),
        "xla": lambda: jax.block_until_ready(xla(a, b)),
        "torch": bm.torch_product_call(ta, tb, tg, False),
    }
    orders = (
        ["kernel", "xla", "torch"],
        ["xla", "kernel", "torch"],
        ["kernel", "xla"],
        ["torch", "xla", "kernel"],
    )
    for order in orders:
        timed = interleaved_seconds({name: calls[name] for name in order}, 10)
        print(order, "  ".join(f"{k} {1e3 * v[1]:.2f} ms" for k, v in timed.items()))


if __name__ == "__main__":
    malloc.restart_with_settings()
    main()
