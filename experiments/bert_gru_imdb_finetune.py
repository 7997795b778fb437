r"""IMDB sentiment with the encoder fine-tuned end to end: MiniLM-L6 (the only BERT whose weights
can be had offline here) and the tuned recipe's head, every weight trained.

Command:   nice -n 19 hw2jax sentiment train --config experiments/bert_gru_imdb_finetune.py \
             --workdir runs/imdb_finetune --encoder minilm
Expected:  90.50 % test (90.40 % valid) after 2 epochs on the flash kernels with hash dropout;
           epoch 2 took 1,522 s on 2 idle Zen 4 cores, 11.5 reviews/s
           (experiments/results/bert_gru_imdb_minilm_finetune_hash_dropout/). Before them:
           90.41 % (experiments/results/bert_gru_imdb_minilm_finetune/). The seed's frozen
           bert-base reached 91.56 %.

Recipe, the usual one for fine-tuning BERT-sized encoders: AdamW with weight decay 0.01, warm-up
for 10 % of the steps then cosine decay, the head at 1e-3 and the encoder's top layer at 5e-5
(encoder_lr_scale 0.05), each layer below at 0.9 times the one above (layer-wise decay, Clark
et al. 2020; Sun et al. 2019), gradient-norm clipping at 1. bf16 compute where one encoder
layer trains faster in it, timed once per machine (encoder_dtype="auto"; float32 elsewhere, e.g.
on a Xeon without AMX), with float32 weights and optimizer state; reviews cut to 256 tokens in
length buckets; checkpoints every 10 minutes, so the run resumes mid-epoch. BERT's dropout is on
while training, as when it was pre-trained.
"""

import bert_gru_imdb_tuned
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = bert_gru_imdb_tuned.get_config()  # the tuned head: mask, mean pool, warmup-cosine
    c.finetune = True
    c.cache_features = False
    c.epochs = 2
    c.batch_size = 16
    c.eval_batch_size = 64
    c.encoder_microbatch = 0
    c.max_length = 256
    c.buckets = (64, 128, 192)
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    c.weight_decay = 0.01
    c.warmup_epochs = 0.2
    c.grad_clip_norm = 1.0
    c.encoder_lr_scale = 0.05
    c.layer_decay = 0.9
    c.encoder_dtype = "auto"  # bf16 where it is measured faster; config.json records which
    c.remat = False
    c.log_every_steps = 50
    return c
