r"""IMDB sentiment, the assignment's head shape with the recipe chosen on the valid split.

Command:   hw2jax sentiment train --config experiments/bert_gru_imdb_tuned.py
           --workdir runs/imdb_tuned --encoder minilm   (offline: all-MiniLM-L6-v2 from PyPI)
Expected:  MiniLM-L6 encoder, bf16, features already in the shared cache: 88.68 % valid
           (epoch 6 of 8) and 88.52 % test accuracy, about 6,900 s of training and 390 s of
           testing on 2 CPU cores (experiments/results/bert_gru_imdb_minilm_tuned/). With
           --set seed=1: 88.63 % valid, 88.38 % test. The encoder pass, when the cache is
           empty, adds about an hour.

Same frozen encoder and head as bert_gru_imdb.py (2-layer BiGRU, hidden 256, dropout 0.25,
linear), with the changes chosen on the valid split: BERT and the GRU see only the real
tokens (use_mask), the linear layer reads the mean of the GRU states over them, and 8 epochs of
warmup-cosine replace 2 at a constant lr (4 epochs gave 86.91 %). Features are cached, so BERT
runs in inference mode.
"""

import bert_gru_imdb
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = bert_gru_imdb.get_config()
    c.use_mask = True
    c.pool = "mean"
    c.epochs = 8
    c.schedule = "warmup_cosine"
    c.warmup_epochs = 0.25
    c.encoder_dtype = "bfloat16"
    c.cache_features = True
    return c
