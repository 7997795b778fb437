"""The IMDB sentiment experiment: BERT + BiGRU, trained by the shared loop; the config's
schema; and training with the single read of test."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hw2jax.attention import dispatch, key_bias
from hw2jax.config import LOOP_SCHEMA, Field, check_config
from hw2jax.data import imdb
from hw2jax.errors import InputError
from hw2jax.models import bert
from hw2jax.models.sentiment import FROZEN_KEY, POOLS, BertGRUSentiment
from hw2jax.tasks.feature_cache import FeatureCache
from hw2jax.tasks.sentiment.data import CachedBatches, bucket_sizes, cache_features, prepare_data
from hw2jax.tasks.sentiment.model import (
    build_model,
    encoder_dtype,
    init_params,
    load_encoder,
    resolve_encoder_dtype,
)
from hw2jax.train import checkpoints, hooks, loop, run_files, steps
from hw2jax.train.batching import IndexBatches

SCHEMA = {
    **LOOP_SCHEMA,
    "eval_split": Field(str, choices=("valid", "test")),
    "split_seed": Field(int),
    "data_source": Field(str, choices=("auto", "local", "tfds")),
    "encoder": Field(str, "a hub id, a local folder or 'minilm'", check=bool),
    "max_length": Field(int, "2 <= max_length <= 512", check=lambda v: 2 <= v <= 512),
    "tail_tokens": Field(int, min=0),  # at most max_length - 2: checked with it below
    "buckets": Field(
        tuple,
        "a tuple of positive lengths",
        check=lambda v: all(isinstance(b, int) and b >= 1 for b in v),
    ),
    "train_size": Field(int, min=1),
    "max_reviews": Field(int, min=0),
    "hidden_dim": Field(int, min=1),
    "n_layers": Field(int, min=1),
    "bidirectional": Field(bool),
    "dropout": Field(float, "0 <= dropout < 1", check=lambda v: 0 <= v < 1),
    "use_mask": Field(bool),
    "pool": Field(str, choices=POOLS),
    "bert_dropout": Field(bool),
    # auto: bf16 where it is measured faster (model.resolve_encoder_dtype).
    "encoder_dtype": Field(str, choices=("auto", "float32", "bfloat16")),
    "encoder_implementation": Field(str, choices=key_bias.IMPLEMENTATIONS),
    "encoder_microbatch": Field(int, min=0),
    "cache_dir": Field(str),
    "cache_features": Field(bool),
    "feature_shard_size": Field(int, min=1),
    "feature_dtype": Field(str, choices=("float16", "bfloat16", "float32")),
    "read_test": Field(bool),
    # Fine-tuning: the encoder trains too, at learning_rate * encoder_lr_scale for its top
    # layer and layer_decay times less for each layer below (embeddings last).
    "finetune": Field(bool),
    "encoder_lr_scale": Field(float, above=0.0),
    "layer_decay": Field(float, "0 < layer_decay <= 1", above=0.0, check=lambda v: v <= 1),
    "remat": Field(bool),
}


def check(config: ml_collections.ConfigDict) -> None:
    """The whole config against :data:`SCHEMA`, before any data is read or compiled."""
    check_config(config.to_dict(), SCHEMA)
    if config.tail_tokens > config.max_length - 2:
        raise InputError(
            f"tail_tokens={config.tail_tokens} leaves no room in max_length={config.max_length} "
            f"for [CLS] and [SEP]: set tail_tokens to at most {config.max_length - 2}."
        )
    if config.finetune and config.cache_features:
        raise InputError(
            "finetune=True trains the encoder, so its features cannot be cached: set "
            "cache_features=False (--set cache_features=False)."
        )


def layer_decay_scale(
    path: tuple[str, ...], *, num_layers: int, top_scale: float, decay: float
) -> float:
    """The learning-rate factor of a parameter when fine-tuning: 1 for the head, ``top_scale``
    for the encoder's top layer (and its pooler), ``decay`` times less for each layer below,
    the embeddings one step under the lowest layer."""
    if path[0] != FROZEN_KEY:
        return 1.0
    below_top = num_layers  # the embeddings
    if path[1].startswith("layer_"):
        below_top = num_layers - 1 - int(path[1].removeprefix("layer_"))
    elif path[1].startswith("pooler"):
        below_top = 0
    return top_scale * decay**below_top


class SentimentTask:
    unit = "reviews"

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        splits: dict[str, dict[str, np.ndarray]],
        bert_config: bert.BertConfig,
        bert_params: Any,
        features: dict[str, FeatureCache] | None = None,
    ):
        self.config = config
        finetune = config.get("finetune", False)
        self.frozen_keys = () if finetune else (FROZEN_KEY,)
        # Per-parameter learning rates only when fine-tuning: a frozen run's optimizer (and
        # the checkpoints it wrote) keeps its plain structure.
        self.learning_rate_scale = (
            functools.partial(
                layer_decay_scale,
                num_layers=bert_config.num_hidden_layers,
                top_scale=config.encoder_lr_scale,
                decay=config.layer_decay,
            )
            if finetune
            else None
        )
        self.model = build_model(config, bert_config)
        self.bert_params = bert_params
        self.lengths = {k: v["length"] for k, v in splits.items()}
        self.splits = {
            k: {"ids": jnp.asarray(v["ids"]), "label": jnp.asarray(v["label"])}
            for k, v in splits.items()
        }
        self.buckets = bucket_sizes(config)
        self.features = features or {}
        # The steps run the encoder unless its outputs are cached; then only the small GRU runs.
        self.compiler_options = {} if features else bert.xla_compiler_options(encoder_dtype(config))

    def init_params(self, rng: jax.Array):
        return init_params(self.model, self.bert_params, rng)

    def apply(self, params, batch, *, train: bool, rng: jax.Array | None) -> jax.Array:
        ids = batch["ids"]
        mask = (ids != 0).astype(jnp.int32)
        features = batch.get("features")
        if features is None:
            features = self.encode(params, ids, mask, train=train, rng=rng)
        rngs = {"dropout": rng} if train else {}
        return self.model.apply(
            {"params": params}, ids, mask, train=train, rngs=rngs, features=features
        )

    def encode(self, params, ids, mask, *, train: bool, rng: jax.Array | None) -> jax.Array:
        """The frozen encoder, ``encoder_microbatch`` reviews at a time: XLA on CPU keeps the
        dropout masks of every BERT layer alive at once, ~0.2 GB per review at 512 tokens."""
        b, t = ids.shape
        chunk = self.config.encoder_microbatch
        chunk = chunk if chunk and b % chunk == 0 else b

        def run(args):
            i, ids_i, mask_i = args
            rngs = {"dropout": jax.random.fold_in(rng, i)} if train else {}
            return self.model.apply(
                {"params": params},
                ids_i,
                mask_i,
                train=train,
                rngs=rngs,
                method=BertGRUSentiment.encode,
            )

        n = b // chunk
        out = jax.lax.map(run, (jnp.arange(n), ids.reshape(n, chunk, t), mask.reshape(n, chunk, t)))
        return out.reshape(b, t, -1)

    def losses(self, logits: jax.Array, batch) -> tuple[jax.Array, jax.Array]:
        labels = batch["label"].astype(jnp.float32)
        loss = optax.sigmoid_binary_cross_entropy(logits, labels)
        return loss, ((logits > 0) == (labels > 0.5)).astype(jnp.float32)

    def _batches(self, split: str, batch_size: int, rng) -> IndexBatches:
        plan = imdb.bucket_batches(self.lengths[split], batch_size, self.buckets, rng)
        batches = IndexBatches(
            self.splits[split],
            [idx for idx, _ in plan],
            batch_size,
            [length for _, length in plan],
            seq_keys=("ids",),
        )
        return CachedBatches(batches, self.features[split]) if split in self.features else batches

    def train_batches(self, epoch: int) -> IndexBatches:
        rng = np.random.default_rng([self.config.seed, epoch])
        return self._batches("train", self.config.batch_size, rng)

    def eval_batches(self, split: str) -> IndexBatches:
        return self._batches(split, self.config.eval_batch_size, None)


@run_files.one_process_per_workdir(check)
def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    extra_hooks: Sequence[hooks.Hook] = (),
) -> dict[str, Any]:
    """Trains the sentiment model, then reads test once from the best-valid checkpoint;
    ``extra_hooks`` join the loop's (:mod:`hw2jax.train.hooks`)."""
    # The encoder's timed dtype joins the paths the loop records (dispatch.recording).
    with dispatch.recording():
        return _train_and_evaluate(config, Path(workdir), extra_hooks)


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: Path, extra_hooks: Sequence[hooks.Hook]
) -> dict[str, Any]:
    # config.json records the dtype that runs here, which a resume then keeps.
    config.encoder_dtype, why = resolve_encoder_dtype(config)
    if why:
        print(why, flush=True)
    run_files.save_run_config(workdir, config)
    bert_config, bert_params, tokenizer = load_encoder(config)
    data = prepare_data(config, tokenizer, workdir)
    features = cache_features(config, data, bert_config, bert_params, tokenizer)
    task = SentimentTask(config, data, bert_config, bert_params, features)
    history = loop.train_and_evaluate(task, config, workdir, extra_hooks=extra_hooks)
    if history["status"] != "done":
        return history
    if loop.test_withheld(config):
        return history
    params_like = task.init_params(jax.random.key(0))
    ckpt = checkpoints.Checkpoints(workdir / "checkpoints")
    best, meta = ckpt.restore_best_params(params_like)
    test = steps.evaluate(task, best, "test")
    final = {
        "best_checkpoint": meta,
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "test_count": test["count"],
        "machines": history["machines"],
    }
    run_files.write_json_atomic(workdir / "results.json", final)
    print(
        f"test accuracy of the best-valid model: {100 * test['accuracy']:.2f}% "
        f"on {test['count']} reviews"
    )
    return history | {"final": final}
