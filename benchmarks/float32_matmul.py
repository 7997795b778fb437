"""float32 dense products on the CPU: XLA's dot (what float32 dense layers run under
differentiation, with YNNPACK's and with XLA's own) and, forward, hw2jax's float32 dense kernel
(``kernels.float32_dense``: BERT's float32 layers where auto takes it) against torch's matmul
(MKL or oneDNN), forward and with gradients, on the shapes of ``bf16_matmul.py``, and the
cores' float32 peak as measured (``kernels.fma_peak_gflops``).

    .venv/bin/python benchmarks/float32_matmul.py [--repeats 10] [--untimed-before 2] [--out DIR]

The three are timed in turn, round after round, in one process (median after warm-up;
compilation excluded); each turn times the last of --untimed-before + 1 calls in a row, as in
``bf16_matmul.py``: a call right after torch's is slowed by its spinning threads. With
gradients, each side computes the product and both input gradients. Writes
``float32_matmul.json``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from bf16_matmul import (
    SHAPES,
    add_untimed_before,
    product_call,
    timed_product_row,
    torch_product_call,
)

from hw2jax import kernels, malloc
from hw2jax.cpu import machine
from hw2jax.models.layers import NO_YNNPACK
from hw2jax.timing import write_results


def time_shape(m: int, k: int, n: int, gradient: bool, repeats: int, untimed_before: int) -> dict:
    import torch

    rng = np.random.default_rng(0)
    a, b, g = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (m, n)))
    ta, tb, tg = (torch.from_numpy(x) for x in (a, b, g))
    a, b, g = (jnp.asarray(x) for x in (a, b, g))
    xla = product_call(lambda a, b: a @ b, g, gradient)
    own = product_call(lambda a, b: a @ b, g, gradient, dict(NO_YNNPACK))
    calls = {
        "xla": lambda: jax.block_until_ready(xla(a, b)),
        "xla_own_dot": lambda: jax.block_until_ready(own(a, b)),
    }
    if not gradient:  # differentiated, the kernel's call runs as XLA's steps
        kernel = jax.jit(kernels.float32_dense)
        calls["kernel"] = lambda: jax.block_until_ready(kernel(a, b))
    # torch last in each round: the call after it meets its spinning threads
    calls["torch"] = torch_product_call(ta, tb, tg, gradient)
    return timed_product_row(calls, m, k, n, gradient, repeats, untimed_before)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10)
    add_untimed_before(parser)
    parser.add_argument("--out", default="benchmarks/results/float32_matmul")
    args = parser.parse_args(argv)
    import torch

    meta = {
        **machine(),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "untimed_before": args.untimed_before,
        "fma_peak_gflops": kernels.fma_peak_gflops(),
    }
    print(meta)
    print(
        f"{'layer':22s} {'pass':8s} {'xla':>8s} {'own dot':>8s} {'kernel':>8s} {'torch':>8s}"
        "  (GFLOP/s)  time / torch's: xla, own dot, kernel"
    )
    rows = []
    for name, (m, k, n) in SHAPES.items():
        for gradient in (False, True):
            row = {
                "layer": name,
                **time_shape(m, k, n, gradient, args.repeats, args.untimed_before),
            }
            rows.append(row)
            rate, ms = row["gflop_s"], row["ms"]
            kernel = (
                (f"{rate['kernel']:8.1f}", f"{ms['kernel'] / ms['torch']:6.2f}x")
                if ("kernel" in ms)
                else (f"{'-':>8s}", f"{'-':>7s}")
            )
            print(
                f"{name:22s} {row['pass']:8s} {rate['xla']:8.1f} {rate['xla_own_dot']:8.1f} "
                f"{kernel[0]} {rate['torch']:8.1f}  {ms['xla'] / ms['torch']:6.2f}x "
                f"{ms['xla_own_dot'] / ms['torch']:6.2f}x {kernel[1]}",
                flush=True,
            )
    write_results(args.out, "float32_matmul.json", meta, rows)


if __name__ == "__main__":
    malloc.restart_with_settings()
    main()
