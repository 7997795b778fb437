"""bf16 products of MiniLM's dense layers on a CPU without AMX: XLA's dot with YNNPACK (its
default), XLA's own dot, XLA's float32 dot, torch's bf16 and float32 matmuls (GFLOP/s, forward,
median of 7 in turn); then q, k and v as three products in one program against one product.

    .venv/bin/python benchmarks/results/zen4/bf16_products/bf16_products.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[3]))  # benchmarks/

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax import malloc
from hw2jax.models.layers import NO_YNNPACK
from hw2jax.timing import interleaved_seconds


def jax_call(fn, *args):
    return lambda: jax.block_until_ready(fn(*args))


def products() -> None:
    import bf16_matmul as bm
    import torch

    rng = np.random.default_rng(0)
    for name, (m, k, n) in bm.SHAPES.items():
        if "ViT" in name:
            continue
        a = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        b = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
        af, bf = a.astype(jnp.float32), b.astype(jnp.float32)
        ta, tb = (torch.from_numpy(np.array(x)).bfloat16() for x in (af, bf))
        ynn = jax.jit(bm.xla_product)
        own = jax.jit(bm.xla_product, compiler_options=dict(NO_YNNPACK))
        f32 = jax.jit(lambda a, b: a @ b, compiler_options=dict(NO_YNNPACK))
        calls = {
            "xla bf16 ynnpack": jax_call(ynn, a, b),
            "xla bf16 own dot": jax_call(own, a, b),
            "xla f32 own dot": jax_call(f32, af, bf),
            "torch bf16": bm.torch_product_call(ta, tb, None, False),
            "torch f32": bm.torch_product_call(ta.float(), tb.float(), None, False),
        }
        row = bm.timed_product_row(calls, m, k, n, False, 7)
        print(name, {key: round(v, 1) for key, v in row["gflop_s"].items()}, flush=True)


def qkv_in_one_product() -> None:
    import bf16_matmul as bm

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8192, 384)), jnp.bfloat16)
    ws = [jnp.asarray(rng.standard_normal((384, 384)) * 0.05, jnp.bfloat16) for _ in range(3)]
    w3 = jnp.concatenate(ws, 1)
    three = jax.jit(lambda x, a, b, c: [bm.xla_product(x, w) for w in (a, b, c)])
    one_split = jax.jit(lambda x, w: jnp.split(bm.xla_product(x, w), 3, 1))
    one = jax.jit(bm.xla_product)
    calls = {
        "three products": jax_call(three, x, *ws),
        "one product, split": jax_call(one_split, x, w3),
        "one product": jax_call(one, x, w3),
    }
    for name, (_, median) in interleaved_seconds(calls, 15).items():
        print(f"{name}: {1e3 * median:.2f} ms, {2 * 8192 * 384 * 1152 / median / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    malloc.restart_with_settings()
    products()
    qkv_in_one_product()
