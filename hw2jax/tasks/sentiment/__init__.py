"""The IMDB sentiment experiment: BERT + BiGRU. ``task`` (the schema, the task the loop trains
and ``train_and_evaluate``), ``data`` (tokens, splits, buckets, cached features), ``model``
(encoder, tokenizer, model and params from a config), ``predict`` and ``pack``."""

from hw2jax.tasks.sentiment.data import cache_features, prepare_data, tokenized_splits
from hw2jax.tasks.sentiment.model import build_model, init_params, load_encoder, load_tokenizer
from hw2jax.tasks.sentiment.pack import pack
from hw2jax.tasks.sentiment.predict import predict, predict_reviews
from hw2jax.tasks.sentiment.task import SCHEMA, SentimentTask, check, train_and_evaluate

__all__ = [
    "SCHEMA",
    "SentimentTask",
    "build_model",
    "cache_features",
    "check",
    "init_params",
    "load_encoder",
    "load_tokenizer",
    "pack",
    "predict",
    "predict_reviews",
    "prepare_data",
    "tokenized_splits",
    "train_and_evaluate",
]
