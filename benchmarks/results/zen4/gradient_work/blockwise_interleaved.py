"""The blockwise softmax with gradients at T = 4,096 (non-causal, B 1, H 4, D 64), its three
timed forms in turn, seven rounds: the gradients of out.sum() alone, the output kept with a
random cotangent's gradients, and value_and_grad of the sum (attention_scaling.timed_pass).

    .venv/bin/python benchmarks/results/zen4/gradient_work/blockwise_interleaved.py
"""

import time

import jax

from hw2jax.attention import softmax_attention

t = 4096
q, k, v, g = (
    jax.random.normal(key, (1, t, 4, 64)) for key in jax.random.split(jax.random.key(0), 4)
)


def fn(q, k, v):
    return softmax_attention(q, k, v, implementation="blockwise")


def kept(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(g)


forms = {
    "gradients of the sum alone": jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), (0, 1, 2))),
    "output kept": jax.jit(kept),
    "value_and_grad": jax.jit(jax.value_and_grad(lambda q, k, v: fn(q, k, v).sum(), (0, 1, 2))),
}
for f in forms.values():
    jax.block_until_ready(f(q, k, v))
times = {name: [] for name in forms}
for _ in range(7):
    for name, f in forms.items():
        start = time.perf_counter()
        jax.block_until_ready(f(q, k, v))
        times[name].append(1e3 * (time.perf_counter() - start))
for name, ms in times.items():
    print(f"{name:28s} ms, sorted: {[round(x) for x in sorted(ms)]}")
