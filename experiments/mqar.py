r"""Multi-query associative recall (MQAR, the Zoology study's task): which attention variants
recall key-value pairs, and at what state size.

Command:   hw2jax mqar sweep --config experiments/mqar.py --workdir runs/mqar
           (one model: hw2jax mqar train --config experiments/mqar.py --workdir runs/one \
             --set model.mixer=gla --set seq_len=256)
Expected:  softmax 100 % recall at every T and width; at T = 512 (32 pairs) linear attention
           4.9 % at width 32 and 95.9 % at width 64, cosFormer 4.1 / 49.3 %, gated linear
           attention 2.8 / 5.2 %; 48 runs, 76 minutes on 2 CPU cores. Table and plot:
           experiments/results/mqar/.

Sequences of seq_len tokens open with seq_len / 16 key-value pairs; every later position asks for
one of those keys' values. 2-layer models (short causal convolution, mixer, MLP), head size 32,
at two widths; every mixer sees the same data. Choices are sized for a 2-core CPU.
"""

import common
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = common.get_config()
    c.seed = 0
    c.epochs = 2
    c.batch_size = 32
    c.eval_batch_size = 250
    c.optimizer = "adamw"
    c.learning_rate = 1e-2
    c.weight_decay = 0.1
    c.schedule = "warmup_cosine"
    c.warmup_epochs = 0.2
    c.log_every_steps = 50
    c.data_source = "generated"
    c.seq_len = 64
    c.num_pairs = 0  # 0: seq_len // 16
    c.vocab_size = 80
    c.train_size = 8000
    c.test_size = 500
    c.model = ml_collections.ConfigDict(dict(dim=64, heads=2, depth=2, mixer="softmax"))
    c.sweep = ml_collections.ConfigDict(
        dict(
            mixers=("softmax", "linear", "performer", "cosformer", "retention", "gla"),
            seq_lens=(64, 128, 256, 512),
            dims=(32, 64),
        )
    )
    return c
