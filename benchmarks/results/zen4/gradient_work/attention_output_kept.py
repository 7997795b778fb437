"""Attention with gradients, timed two ways in one process: the gradients of out.sum() alone
(what attention_scaling.py timed before 2026-12-05), and the output with the gradients of a
random cotangent (what a training step and torch's side compute). Median of 5 after a warm-up
call; B 1, H 4, D 64, float32.

    .venv/bin/python benchmarks/results/zen4/gradient_work/attention_output_kept.py
"""

import time

import jax

from hw2jax.attention import softmax_attention
from hw2jax.cpu import machine


def median_ms(f, *args) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[2]


def products(f, *args) -> int:
    return sum(" dot(" in line for line in f.lower(*args).compile().as_text().split("\n"))


print(machine())
for t in (2048, 4096):
    q, k, v, g = (
        jax.random.normal(key, (1, t, 4, 64)) for key in jax.random.split(jax.random.key(0), 4)
    )
    for impl in ("naive", "xla", "blockwise", "auto"):
        for causal in (False, True):

            def fn(q, k, v, impl=impl, causal=causal):
                return softmax_attention(q, k, v, causal=causal, implementation=impl)

            summed = jax.jit(jax.grad(lambda q, k, v, fn=fn: fn(q, k, v).sum(), (0, 1, 2)))

            def kept(q, k, v, fn=fn, g=g):
                out, vjp = jax.vjp(fn, q, k, v)
                return out, vjp(g)

            kept = jax.jit(kept)
            a, b = median_ms(summed, q, k, v), median_ms(kept, q, k, v)
            print(
                f"T {t:5d} {impl:9s} causal={causal!s:5s} gradients of the sum alone {a:8.1f} ms "
                f"({products(summed, q, k, v)} dots), output kept {b:8.1f} ms "
                f"({products(kept, q, k, v)} dots): {b / a:.2f}x",
                flush=True,
            )
