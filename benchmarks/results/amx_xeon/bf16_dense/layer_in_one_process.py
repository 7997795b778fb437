"""MiniLM's bf16 forward (32 x 256 tokens): the layer as it was before the bf16 dense calls
against BertLayer now, in one process, alternating; both on this library's kernels (the
GELU call of before is amx_dense on bf16 weights, the same kernel).
Usage: layer_in_one_process.py [ROUNDS] > out.json (start it with hw2jax.malloc.TUNABLES in
GLIBC_TUNABLES, as the benchmarks run)."""

import json
import math
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hw2jax import kernels
from hw2jax.attention.key_bias import key_bias_attention
from hw2jax.models import bert
from hw2jax.models.layers import LayerNorm, dense_dot


class OldDense(
    nn.Module
):  # the layer before: XLA's bf16 copy of the weights, the product, then the bias
    features: int
    gelu: bool = False

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=jnp.bfloat16)
        if self.gelu:
            return kernels.amx_dense(x, kernel, bias, gelu=True, out_dtype=jnp.bfloat16)
        return dense_dot(x, kernel), bias


class OldLayer(bert.BertLayer):
    @nn.compact
    def __call__(self, x, key_bias, deterministic=True):
        c = self.config
        heads, dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        qkv = []
        for n in ("query", "key", "value"):
            t, b = OldDense(c.hidden_size, name=n)(x)
            qkv.append((t + b).reshape(*t.shape[:-1], heads, dim).astype(jnp.bfloat16))
        ctx = key_bias_attention(*qkv, key_bias, scale=1.0 / math.sqrt(dim), what="B").astype(
            jnp.bfloat16
        )
        ctx = ctx.reshape(*x.shape[:-1], c.hidden_size)
        h, b = OldDense(c.hidden_size, name="attention_output_dense")(ctx)
        x = LayerNorm(
            epsilon=c.layer_norm_eps, dtype=jnp.bfloat16, name="attention_output_LayerNorm"
        )(x, plus=(h, b))
        h = OldDense(c.intermediate_size, gelu=True, name="intermediate_dense")(x)
        h, b = OldDense(c.hidden_size, name="output_dense")(h)
        return LayerNorm(epsilon=c.layer_norm_eps, dtype=jnp.bfloat16, name="output_LayerNorm")(
            x, plus=(h, b)
        )


config, params, _ = bert.load_pretrained("minilm")
ids = jnp.asarray(np.random.default_rng(0).integers(1000, config.vocab_size, (32, 256)))
new_layer = bert.BertLayer
fs = {}
for name, layer in (("before", OldLayer), ("now", new_layer)):
    bert.BertLayer = layer
    model = bert.BertModel(config, dtype=jnp.bfloat16)
    f = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x)[0])
    f(params, ids).block_until_ready()
    fs[name] = f
bert.BertLayer = new_layer
a, b = (np.asarray(fs[k](params, ids).astype(jnp.float32)) for k in fs)
t = {k: [] for k in fs}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 25):
    for k, f in fs.items():
        t0 = time.perf_counter()
        f(params, ids).block_until_ready()
        t[k].append(time.perf_counter() - t0)
med = {k: float(np.median(v) * 1e3) for k, v in t.items()}
print(
    json.dumps(
        {
            "equal_bitwise": bool((a == b).all()),
            "median_ms": med,
            "speedup": med["before"] / med["now"],
            "ms": {k: [round(x * 1e3, 2) for x in v] for k, v in t.items()},
        }
    )
)
