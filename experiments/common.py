r"""Shared defaults of the training loop (hw2jax.train.loop); every experiment starts here.

Each config in experiments/ does `import common`, takes `common.get_config()` and states only
what differs. `hw2jax.config.LOOP_SCHEMA` checks these keys (types, choices, ranges) before any
data is loaded or anything is compiled.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.epochs = 1
    c.batch_size = 128
    c.eval_batch_size = 128
    # adam_l2: torch.optim.Adam(lr, weight_decay), L2 added to the gradient; adamw: decoupled.
    c.optimizer = "adam_l2"
    c.learning_rate = 1e-3
    c.weight_decay = 0.0
    c.schedule = "constant"  # or warmup_cosine
    c.warmup_epochs = 0.0
    c.grad_clip_norm = 0.0  # 0: no clipping
    c.log_every_steps = 100
    c.eval_split = "test"  # evaluated after every epoch
    c.best_metric = "test_accuracy"  # picks the `best` checkpoint
    c.progress = True
    c.devices = "1"  # "all" or a count: data parallel over a jax.sharding mesh
    c.data_dir = ""  # "" = $HW2JAX_DATA_DIR, then the usual places, then TFDS
    c.data_source = "auto"
    # Besides each epoch's end, save the latest state this often (0: epoch ends only), so a
    # kill -9 or a lost machine costs at most this much work.
    c.checkpoint_every_minutes = 10.0
    return c
