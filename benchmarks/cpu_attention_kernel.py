"""One BERT layer's attention on the CPU: the fused kernel (hw2jax.kernels) against XLA's
attention as BertModel computes it otherwise, and torch's scaled_dot_product_attention.

    .venv/bin/python benchmarks/cpu_attention_kernel.py [--repeats 10] [--out benchmarks/results]

Shapes: [batch 32, T 256, heads 12, head dim D] float32, D = 32 (MiniLM) and 64 (bert-base);
q, k, v random, no mask. The three are timed in turn, round after round, in one process (median
after warm-up; compilation excluded). Writes ``cpu_attention_kernel.json``.
"""

from __future__ import annotations

import argparse
import math

import jax
import numpy as np

from hw2jax import kernels, malloc
from hw2jax.attention import key_bias_attention
from hw2jax.cpu import machine
from hw2jax.models import bert
from hw2jax.timing import interleaved_seconds, write_results


def time_layer(batch: int, tokens: int, heads: int, head_dim: int, repeats: int) -> dict:
    import torch

    rng = np.random.default_rng(0)
    q, k, v = (
        rng.standard_normal((batch, tokens, heads, head_dim)).astype(np.float32) for _ in range(3)
    )
    scale = 1.0 / math.sqrt(head_dim)
    fused = jax.jit(lambda q, k, v: kernels.cpu_attention(q, k, v, scale=scale))
    xla = jax.jit(
        lambda q, k, v: key_bias_attention(q * scale, k, v, implementation="xla"),
        compiler_options=bert.xla_compiler_options(None),
    )  # as BertModel runs it
    tq, tk, tv = (torch.from_numpy(a.transpose(0, 2, 1, 3).copy()) for a in (q, k, v))
    reference = np.asarray(xla(q, k, v))
    error = float(np.abs(np.asarray(fused(q, k, v)) - reference).max())
    sdpa = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).numpy()
    torch_error = float(np.abs(sdpa.transpose(0, 2, 1, 3) - reference).max())

    def run_torch():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

    timed = interleaved_seconds(
        {
            "fused kernel": lambda: fused(q, k, v).block_until_ready(),
            "xla": lambda: xla(q, k, v).block_until_ready(),
            "torch sdpa": run_torch,
        },
        repeats,
    )
    return {
        "shape": [batch, tokens, heads, head_dim],
        "ms": {name: 1e3 * median for name, (_, median) in timed.items()},
        "calls_s": {name: calls for name, (calls, _) in timed.items()},
        "max_abs_diff_vs_xla": {"fused kernel": error, "torch sdpa": torch_error},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    reason = kernels.cpu_attention_unavailable_reason(32, np.float32)
    if reason is not None:
        raise SystemExit(f"the fused kernel cannot run here: {reason}")
    import torch

    rows = [time_layer(32, 256, 12, d, args.repeats) for d in (32, 64)]
    meta = {
        **machine(),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "kernel_features": kernels.kernel_vector_features(),  # its build target
    }
    print(meta)
    print(f"{'shape':22s} {'fused kernel':>13s} {'xla':>9s} {'torch sdpa':>11s}   (ms per call)")
    for r in rows:
        ms = r["ms"]
        print(
            f"{r['shape']!s:22s} {ms['fused kernel']:13.1f} {ms['xla']:9.1f} "
            f"{ms['torch sdpa']:11.1f}   kernel {ms['xla'] / ms['fused kernel']:.2f}x XLA, "
            f"{ms['torch sdpa'] / ms['fused kernel']:.2f}x torch"
        )
    write_results(args.out, "cpu_attention_kernel.json", meta, rows)


if __name__ == "__main__":
    malloc.restart_with_settings()
    main()
