"""The sentiment task's data: IMDB reviews as token ids (tokenized once and cached, or read
from a token pack), the train/valid split, length-bucketed batches, and the frozen encoder's
features cached on disk."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hw2jax.data import imdb, splits
from hw2jax.models import bert
from hw2jax.models.sentiment import BertGRUSentiment
from hw2jax.tasks.feature_cache import DEFAULT_DIR, FeatureCache, content_key, params_digest
from hw2jax.tasks.sentiment.model import (
    build_model,
    encoder_dtype,
    encoder_dtype_name,
    init_params,
)
from hw2jax.train.batching import IndexBatches


def cache_dir(config: ml_collections.ConfigDict) -> Path:
    """Where tokens and encoder features are cached: ``cache_dir``, else one folder that every
    work dir shares, so a second experiment on the same encoder and data encodes nothing."""
    return Path(config.cache_dir).expanduser() if config.cache_dir else DEFAULT_DIR


def bucket_sizes(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    return (*(b for b in config.buckets if b < config.max_length), config.max_length)


class CachedBatches(IndexBatches):
    """IndexBatches plus the cached encoder features of each batch, read from disk."""

    def __init__(self, inner: IndexBatches, cache: FeatureCache):
        super().__init__(
            inner.arrays, inner.batches, inner.batch_size, inner.seq_lens, inner.seq_keys
        )
        self.cache = cache

    def __getitem__(self, i: int):
        batch = super().__getitem__(i)
        feats = self.cache.gather(self.batches[i], self.seq_lens[i], self.batch_size)
        return {**batch, "features": jnp.asarray(feats)}


def vocab_digest(tokenizer) -> str:
    """The tokenizer's vocabulary as a hash: the key of cached features and token packs."""
    return hashlib.sha256(repr(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def tokenized_splits(config: ml_collections.ConfigDict, tokenizer) -> dict:
    """IMDB train and test as token ids, length and label: tokenized once and cached under the
    cache dir, or read from a token pack (``hw2jax sentiment pack``) that fits this tokenizer
    and ``max_length``."""
    source = imdb.find_source(config.data_dir or None, config.data_source)
    print(f"IMDB from {source.description}", file=sys.stderr)
    if isinstance(source, imdb.TokenPackSource):
        source.check(
            max_length=config.max_length,
            vocab_digest=vocab_digest(tokenizer),
            tail_tokens=config.tail_tokens,
        )
    raw = (
        source.load_all()
        if hasattr(source, "load_all")
        else {s: source.load(s) for s in ("train", "test")}
    )
    if config.max_reviews:  # a seeded random subset of each split, for quick runs
        rng = np.random.default_rng(config.split_seed)
        for split, arrays in raw.items():
            keep = np.sort(rng.permutation(len(arrays["label"]))[: config.max_reviews])
            raw[split] = {k: v[keep] for k, v in arrays.items()}
    if isinstance(source, imdb.TokenPackSource):
        return {split: raw[split] for split in ("train", "test")}
    cache = cache_dir(config)
    out = {}
    start = time.perf_counter()
    for split in ("train", "test"):
        ids, lengths = imdb.tokenize(
            raw[split]["text"], tokenizer, config.max_length, cache, config.tail_tokens
        )
        out[split] = {"ids": ids, "length": lengths, "label": np.asarray(raw[split]["label"])}
    print(
        f"tokenized {sum(len(v['ids']) for v in out.values())} reviews in "
        f"{time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return out


def prepare_data(config: ml_collections.ConfigDict, tokenizer, workdir: Path) -> dict:
    """Train/valid/test token arrays: :func:`tokenized_splits`, IMDB train split by seed."""
    out = tokenized_splits(config, tokenizer)
    n = len(out["train"]["ids"])
    train_size = config.train_size if config.train_size < n else round(0.7 * n)
    tr, va = splits.train_valid_split(n, train_size, config.split_seed)
    full = out.pop("train")
    out["train"] = {k: v[tr] for k, v in full.items()}
    out["valid"] = {k: v[va] for k, v in full.items()}
    return out


def cache_features(
    config: ml_collections.ConfigDict,
    data: dict,
    bert_config: bert.BertConfig,
    bert_params: Any,
    tokenizer,
) -> dict[str, FeatureCache] | None:
    """Runs the frozen encoder once per review (``config.cache_features``) into sharded,
    memory-mapped files under the cache dir (:mod:`hw2jax.tasks.feature_cache`), so training
    only runs the GRU head; what is cached already is not encoded again."""
    if not config.cache_features:
        return None
    model = build_model(config, bert_config)
    params = init_params(model, bert_params, jax.random.key(config.seed))
    # Params go in as an argument: closed over, they would become constants that XLA tries to
    # fold into every bucket's program (slow compiles, one copy of the encoder per shape).
    jitted = jax.jit(
        lambda p, ids: model.apply(
            {"params": p}, ids, (ids != 0).astype(jnp.int32), method=BertGRUSentiment.encode
        ),
        compiler_options=bert.xla_compiler_options(encoder_dtype(config)),
    )

    def encode(ids: jax.Array) -> jax.Array:
        return jitted(params, ids)

    weights = params_digest(bert_params)
    vocab = vocab_digest(tokenizer)
    out = {}
    for split, arrays in data.items():
        key = content_key(
            encoder_weights=weights,
            tokenizer=vocab,
            max_length=config.max_length,
            buckets=bucket_sizes(config),
            encoder_dtype=encoder_dtype_name(config),
            feature_dtype=config.feature_dtype,
            use_mask=config.use_mask,
            review_ids=arrays["ids"],
        )
        start = time.perf_counter()
        out[split] = FeatureCache.build(
            cache_dir(config) / f"{split}-{key}",
            encode,
            arrays["ids"],
            arrays["length"],
            bucket_sizes(config),
            bert_config.hidden_size,
            config.feature_dtype,
            config.eval_batch_size,
            shard_size=config.feature_shard_size,
            progress=config.progress,
            desc=f"encoding {split}",
        )
        print(
            f"features for {split}: {out[split].nbytes() / 2**20:.0f} MiB "
            f"({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
        )
    return out
