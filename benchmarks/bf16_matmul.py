"""bf16 dense products on the CPU: the AMX kernel (hw2jax.kernels.amx_matmul), XLA's dot as a
dense layer computes it otherwise, and torch's bf16 matmul (oneDNN), forward and with gradients.

    .venv/bin/python benchmarks/bf16_matmul.py [--repeats 10] [--out benchmarks/results/amx_matmul]

Shapes: the dense layers of MiniLM (32 x 256 tokens, hidden 384, intermediate 1,536) and of the
ViT (256 images x 50 tokens, dim 64, MLP 128), [tokens, in] x [in, out], inputs random bf16,
float32 out. "with gradients" is the product and both of its input gradients (a loss
sum(c * g) for a fixed g). The three are timed in turn, round after round, in one process
(median after warm-up; compilation excluded). Writes ``bf16_matmul.json``. Needs a CPU with
AMX-BF16.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax import kernels
from hw2jax.cpu import machine
from hw2jax.timing import interleaved_seconds, runtime_settings, write_results

SHAPES = {
    "MiniLM q/k/v/out": (8192, 384, 384),
    "MiniLM intermediate": (8192, 384, 1536),
    "MiniLM output": (8192, 1536, 384),
    "ViT MLP in": (12800, 64, 128),
    "ViT MLP out": (12800, 128, 64),
}


def xla_product(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def time_shape(m: int, k: int, n: int, gradient: bool, repeats: int) -> dict:
    import torch

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    ta = torch.from_numpy(np.array(a.astype(jnp.float32))).bfloat16()
    tb = torch.from_numpy(np.array(b.astype(jnp.float32))).bfloat16()
    tg = torch.from_numpy(np.array(g)).bfloat16()

    def jax_fn(product):
        if not gradient:
            return jax.jit(product)
        return jax.jit(jax.grad(lambda a, b: jnp.sum(product(a, b) * g), argnums=(0, 1)))

    amx, xla = jax_fn(kernels.amx_matmul), jax_fn(xla_product)
    error = float(
        np.abs(
            np.asarray(amx(a, b)[0] if gradient else amx(a, b), np.float32)
            - np.asarray(xla(a, b)[0] if gradient else xla(a, b), np.float32)
        ).max()
    )

    def run_torch():
        if not gradient:
            with torch.no_grad():
                return ta @ tb
        x, w = ta.detach().requires_grad_(), tb.detach().requires_grad_()
        (x @ w).backward(tg)
        return x.grad

    timed = interleaved_seconds(
        {
            "amx kernel": lambda: jax.block_until_ready(amx(a, b)),
            "xla": lambda: jax.block_until_ready(xla(a, b)),
            "torch": run_torch,
        },
        repeats,
    )
    ms = {name: 1e3 * median for name, (_, median) in timed.items()}
    flops = 2 * m * k * n * (3 if gradient else 1)
    return {
        "shape": [m, k, n],
        "pass": "fwd+bwd" if gradient else "fwd",
        "ms": ms,
        "gflop_s": {name: flops / t / 1e6 for name, t in ms.items()},
        "max_abs_diff_vs_xla": error,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/amx_matmul")
    args = parser.parse_args(argv)
    reason = kernels.amx_matmul_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"the AMX kernel cannot run here: {reason}")
    import torch

    meta = {
        **machine(),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "env": runtime_settings(),
        "kernel_features": kernels.kernel_vector_features(),
    }
    print(meta)
    print(
        f"{'layer':22s} {'pass':8s} {'amx':>8s} {'xla':>8s} {'torch':>8s}  (ms)  amx/xla  amx/torch"
    )
    rows = []
    for name, (m, k, n) in SHAPES.items():
        for gradient in (False, True):
            row = {"layer": name, **time_shape(m, k, n, gradient, args.repeats)}
            rows.append(row)
            ms = row["ms"]
            print(
                f"{name:22s} {row['pass']:8s} {ms['amx kernel']:8.2f} {ms['xla']:8.2f} "
                f"{ms['torch']:8.2f}  {ms['xla'] / ms['amx kernel']:6.2f}x  "
                f"{ms['torch'] / ms['amx kernel']:6.2f}x",
                flush=True,
            )
    write_results(args.out, "bf16_matmul.json", meta, rows)


if __name__ == "__main__":
    main()
