"""The IMDB sentiment experiment: frozen BERT + BiGRU, trained by the shared loop."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hw2jax.data import imdb
from hw2jax.models import bert
from hw2jax.models.sentiment import FROZEN_KEY, BertGRUSentiment
from hw2jax.train import checkpoints, loop
from hw2jax.train.batching import IndexBatches


def load_tokenizer(folder: str | Path):
    """The encoder's fast tokenizer, from its folder (tokenizer.json or vocab.txt)."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return BertTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    if (folder / "vocab.txt").is_file():
        return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.txt.")


def build_model(config: ml_collections.ConfigDict, bert_config: bert.BertConfig
                ) -> BertGRUSentiment:  # fmt: skip
    return BertGRUSentiment(
        bert_config, hidden_dim=config.hidden_dim, n_layers=config.n_layers,
        bidirectional=config.bidirectional, dropout=config.dropout, use_mask=config.use_mask,
        bert_dropout=config.bert_dropout,
    )  # fmt: skip


class SentimentTask:
    frozen_keys = (FROZEN_KEY,)

    def __init__(self, config: ml_collections.ConfigDict, splits: dict[str, dict[str, np.ndarray]],
                 bert_config: bert.BertConfig, bert_params: Any):  # fmt: skip
        self.config = config
        self.model = build_model(config, bert_config)
        self.bert_params = bert_params
        self.lengths = {k: v["length"] for k, v in splits.items()}
        self.splits = {k: {"ids": jnp.asarray(v["ids"]), "label": jnp.asarray(v["label"])}
                       for k, v in splits.items()}  # fmt: skip
        self.buckets = (*(b for b in config.buckets if b < config.max_length), config.max_length)

    def init_params(self, rng: jax.Array):
        params = self.model.init(rng, jnp.ones((1, 8), jnp.int32))["params"]
        if self.bert_params is not None:
            params = {**params, FROZEN_KEY: self.bert_params}
        return params

    def apply(self, params, batch, *, train: bool, rng: jax.Array | None) -> jax.Array:
        ids = batch["ids"]
        mask = (ids != 0).astype(jnp.int32)
        rngs = {"dropout": rng} if train else {}
        return self.model.apply({"params": params}, ids, mask, train=train, rngs=rngs)

    def losses(self, logits: jax.Array, batch) -> tuple[jax.Array, jax.Array]:
        labels = batch["label"].astype(jnp.float32)
        loss = optax.sigmoid_binary_cross_entropy(logits, labels)
        return loss, ((logits > 0) == (labels > 0.5)).astype(jnp.float32)

    def _batches(self, split: str, batch_size: int, rng) -> IndexBatches:
        plan = imdb.bucket_batches(self.lengths[split], batch_size, self.buckets, rng)
        return IndexBatches(self.splits[split], [idx for idx, _ in plan], batch_size,
                            [length for _, length in plan], seq_keys=("ids",))  # fmt: skip

    def train_batches(self, epoch: int) -> IndexBatches:
        rng = np.random.default_rng([self.config.seed, epoch])
        return self._batches("train", self.config.batch_size, rng)

    def eval_batches(self, split: str) -> IndexBatches:
        return self._batches(split, self.config.eval_batch_size, None)


def prepare_data(config: ml_collections.ConfigDict, tokenizer, workdir: Path) -> dict:
    """Train/valid/test token arrays, tokenized once and cached under the work dir."""
    source = imdb.find_source(config.data_dir or None, config.data_source)
    print(f"IMDB from {source.description}", file=sys.stderr)
    raw = source.load_all() if hasattr(source, "load_all") else {
        s: source.load(s) for s in ("train", "test")}  # fmt: skip
    cache = Path(config.cache_dir) if config.cache_dir else workdir / "cache"
    out = {}
    start = time.perf_counter()
    for split in ("train", "test"):
        ids, lengths = imdb.tokenize(raw[split]["text"], tokenizer, config.max_length, cache)
        out[split] = {"ids": ids, "length": lengths, "label": np.asarray(raw[split]["label"])}
    print(f"tokenized {sum(len(v['ids']) for v in out.values())} reviews in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)  # fmt: skip
    n = len(out["train"]["ids"])
    train_size = config.train_size if config.train_size < n else round(0.7 * n)
    tr, va = imdb.train_valid_split(n, train_size, config.split_seed)
    full = out.pop("train")
    out["train"] = {k: v[tr] for k, v in full.items()}
    out["valid"] = {k: v[va] for k, v in full.items()}
    return out


def _setup(config: ml_collections.ConfigDict, workdir: Path):
    bert_config, bert_params, folder = bert.load_pretrained(config.encoder)
    if config.encoder_overrides:
        # A tiny random encoder for tests: keep the tokenizer, replace the weights.
        bert_config = bert.BertConfig.from_dict({**bert_config.__dict__,
                                                 **config.encoder_overrides.to_dict()})  # fmt: skip
        bert_params = None
    tokenizer = load_tokenizer(folder)
    return bert_config, bert_params, tokenizer


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    loop.write_json_atomic(workdir / "config.json", config.to_dict())
    bert_config, bert_params, tokenizer = _setup(config, workdir)
    data = prepare_data(config, tokenizer, workdir)
    task = SentimentTask(config, data, bert_config, bert_params)
    history = loop.train_and_evaluate(task, config, workdir)
    if history["status"] != "done":
        return history
    params_like = task.init_params(jax.random.key(0))
    ckpt = checkpoints.Checkpoints(workdir / "checkpoints")
    best, meta = ckpt.restore_best_params(params_like)
    test = loop.evaluate(task, best, "test")
    final = {"best_checkpoint": meta, "test_loss": test["loss"], "test_accuracy": test["accuracy"],
             "test_count": test["count"]}  # fmt: skip
    loop.write_json_atomic(workdir / "results.json", final)
    print(f"test accuracy of the best-valid model: {100 * test['accuracy']:.2f}% "
          f"on {test['count']} reviews")  # fmt: skip
    return history | {"final": final}


def predict(workdir: str | Path, texts: list[str]) -> list[float]:
    """P(positive) for each text, from the best checkpoint in ``workdir``."""
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found; train first with this --workdir.")
    if not texts or any(not t.strip() for t in texts):
        raise ValueError("give at least one non-empty text to predict.")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    bert_config, bert_params, tokenizer = _setup(config, workdir)
    model = build_model(config, bert_config)
    params_like = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    if bert_params is not None:
        params_like = {**params_like, FROZEN_KEY: bert_params}
    params, _ = checkpoints.Checkpoints(workdir / "checkpoints").restore_best_params(params_like)
    ids, lengths = imdb.tokenize(texts, tokenizer, config.max_length)
    apply = jax.jit(lambda p, x: jax.nn.sigmoid(model.apply({"params": p}, x)))
    # One text at a time with no padding, as the assignment's predict_sentiment did: the
    # faithful (unmasked) model would otherwise see the padding.
    return [float(apply(params, jnp.asarray(row[None, :n]))[0]) for row, n in zip(ids, lengths,
                                                                                  strict=True)]
