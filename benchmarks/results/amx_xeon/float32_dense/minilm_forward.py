"""MiniLM-L6's float32 forward (batch 32 x 256 tokens, random ids, the malloc settings of the
caller's environment), as BERT's programs compile it: median and fastest of N calls after three
that compile and warm up. Run from a checkout with PYTHONPATH at it to time that code.

    python minilm_forward.py [N] [OUT.npy]
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax.models import bert

config, params, _ = bert.load_pretrained("minilm")
ids = jnp.asarray(np.random.default_rng(0).integers(1000, config.vocab_size, (32, 256)))
model = bert.BertModel(config)
forward = jax.jit(
    lambda p, x: model.apply({"params": p}, x)[0],
    compiler_options=bert.xla_compiler_options(None),
)
out = forward(params, ids).block_until_ready()
for _ in range(2):
    forward(params, ids).block_until_ready()
seconds = []
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 8):
    start = time.perf_counter()
    forward(params, ids).block_until_ready()
    seconds.append(time.perf_counter() - start)
print(f"median {np.median(seconds) * 1e3:.1f} ms  min {np.min(seconds) * 1e3:.1f}")
if len(sys.argv) > 2:
    np.save(sys.argv[2], np.asarray(out))
