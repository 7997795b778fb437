"""The bf16 product kernel on products of a few hundred rows and more, MiniLM's shapes
([M, 384] x [384, 384], x [384, 1536], [M, 1536] x [1536, 384]): as it is, on the calling
thread alone (no helper woken), and in items of 32 rows, chosen per call in one process, 16
products in one program (as a model's step calls them). ``--large`` adds 4,096 and 8,192 rows
(a MiniLM batch) and leaves out the one-thread variant.

Needs the kernel built with variants.diff (environment variables read per call):

    git apply benchmarks/results/amx_xeon/small_products/variants.diff
    HW2JAX_KERNEL_CACHE=/tmp/kc .venv/bin/python \
        benchmarks/results/amx_xeon/small_products/small_products.py
"""

import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax.cpu import machine
from hw2jax.kernels import matmul

CHAIN = 16
VARIANTS = {  # name: the variables set for it
    "as it is": {},
    "one thread": {"HW2JAX_HELPER_MIN": str(10**15)},
    "32-row items": {"HW2JAX_ITEM_ROWS": "32"},
}


def chain(a, b):
    k, n = b.shape
    acc = jnp.zeros((a.shape[1], n), jnp.float32)
    for i in range(CHAIN):  # each product depends on the one before, as a layer's on the last
        recycled = jnp.resize(acc[:, : min(k, n)], (a.shape[1], k)).astype(jnp.bfloat16)
        acc = acc + matmul.amx_matmul(a[i] + recycled, b)
    return acc


def main():
    large = "--large" in sys.argv
    variants = {n: e for n, e in VARIANTS.items() if not (large and n == "one thread")}
    print(machine()["cpu_model"], machine()["env"], matmul.bf16_products_engine())
    rng = np.random.default_rng(0)
    rows = (512, 2048, 4096, 8192) if large else (32, 64, 128, 192, 256, 384, 512, 1024, 2048)
    for (k, n), m in itertools.product(((384, 384), (384, 1536), (1536, 384)), rows):
        b = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
        a = jnp.asarray(rng.standard_normal((CHAIN, m, k)), jnp.bfloat16)
        f = jax.jit(chain)
        times = {name: [] for name in variants}
        outputs = {}
        for _ in range(7):  # rounds: each variant in turn
            for name, env in variants.items():
                for var in ("HW2JAX_HELPER_MIN", "HW2JAX_ITEM_ROWS"):
                    os.environ.pop(var, None)
                os.environ.update(env)
                out = jax.block_until_ready(f(a, b))
                start = time.perf_counter()
                calls = max(2, 20 * 256 // m)
                for _ in range(calls):
                    out = f(a, b)
                out.block_until_ready()
                times[name].append((time.perf_counter() - start) / calls / CHAIN * 1e6)
                outputs[name] = np.asarray(out)
        assert all((o == outputs["as it is"]).all() for o in outputs.values()), "bits differ"
        best = {name: min(t) for name, t in times.items()}
        base = best["as it is"]
        cells = "  ".join(f"{n} {t:6.1f} us ({base / t:.2f}x)" for n, t in best.items())
        print(f"{m:5d} x {k:4d} x {n:4d}: {cells}", flush=True)


if __name__ == "__main__":
    main()
