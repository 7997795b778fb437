"""The IMDB sentiment experiment: frozen BERT + BiGRU, trained by the shared loop."""

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
import optax

from hw2jax.attention import key_bias
from hw2jax.config import LOOP_SCHEMA, Field, check_config
from hw2jax.data import imdb, splits
from hw2jax.models import bert
from hw2jax.models.sentiment import FROZEN_KEY, POOLS, BertGRUSentiment
from hw2jax.tasks.feature_cache import DEFAULT_DIR, FeatureCache, content_key, params_digest
from hw2jax.train import checkpoints, loop
from hw2jax.train.batching import IndexBatches

SCHEMA = {
    **LOOP_SCHEMA,
    "eval_split": Field(str, choices=("valid", "test")),
    "split_seed": Field(int),
    "data_source": Field(str, choices=("auto", "local", "tfds")),
    "encoder": Field(str, "a hub id, a local folder or 'minilm'", check=bool),
    "max_length": Field(int, "2 <= max_length <= 512", check=lambda v: 2 <= v <= 512),
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
    "encoder_dtype": Field(str, choices=("float32", "bfloat16")),
    "encoder_implementation": Field(str, choices=key_bias.IMPLEMENTATIONS),
    "encoder_microbatch": Field(int, min=0),
    "cache_dir": Field(str),
    "cache_features": Field(bool),
    "feature_shard_size": Field(int, min=1),
    "feature_dtype": Field(str, choices=("float16", "bfloat16", "float32")),
    "read_test": Field(bool),
}


def check(config: ml_collections.ConfigDict) -> None:
    """The whole config against :data:`SCHEMA`, before any data is read or compiled."""
    check_config(config.to_dict(), SCHEMA)


def load_tokenizer(folder: str | Path):
    """The encoder's fast tokenizer, from its folder (tokenizer.json or vocab.txt)."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return BertTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    if (folder / "vocab.txt").is_file():
        return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.txt.")


def build_model(
    config: ml_collections.ConfigDict, bert_config: bert.BertConfig
) -> BertGRUSentiment:
    return BertGRUSentiment(
        bert_config,
        hidden_dim=config.hidden_dim,
        n_layers=config.n_layers,
        bidirectional=config.bidirectional,
        dropout=config.dropout,
        use_mask=config.use_mask,
        bert_dropout=config.bert_dropout,
        pool=config.pool,
        dtype=encoder_dtype(config),
        implementation=config.encoder_implementation,
    )


def encoder_dtype(config: ml_collections.ConfigDict) -> jnp.dtype | None:
    """The frozen encoder's matmul input dtype (accumulation is float32 either way)."""
    name = config.encoder_dtype
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"encoder_dtype must be 'float32' or 'bfloat16', got {name!r}.")
    return None if name == "float32" else jnp.dtype(name)


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


def init_params(model: BertGRUSentiment, bert_params: Any, rng: jax.Array) -> dict:
    """Fresh GRU/head params with the pretrained encoder under ``bert``."""
    params = model.init(rng, jnp.ones((1, 8), jnp.int32))["params"]
    return {**params, FROZEN_KEY: bert_params}


class SentimentTask:
    frozen_keys = (FROZEN_KEY,)
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
        source.check(max_length=config.max_length, vocab_digest=vocab_digest(tokenizer))
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
        ids, lengths = imdb.tokenize(raw[split]["text"], tokenizer, config.max_length, cache)
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


def pack(config: ml_collections.ConfigDict, out: str | Path, encoder_dtype: str) -> dict:
    """What a machine that receives few megabytes needs to run this config: the encoder as a
    checkpoint folder with weights in ``encoder_dtype`` (``out/encoder``), and the reviews
    tokenized (``out/imdb_tokens.npz``). Returns the files' sizes in bytes."""
    check(config)
    out = Path(out)
    bert_config, bert_params, folder = bert.load_pretrained(config.encoder)
    tokenizer = load_tokenizer(folder)
    imdb.save_token_pack(
        out / imdb.PACK_NAME,
        tokenized_splits(config, tokenizer),
        max_length=config.max_length,
        vocab_digest=vocab_digest(tokenizer),
    )
    bert.save_pretrained(
        out / "encoder", bert_config, bert_params, tokenizer_from=folder, dtype=encoder_dtype
    )
    files = [out / imdb.PACK_NAME, *sorted((out / "encoder").iterdir())]
    return {str(f.relative_to(out)): f.stat().st_size for f in files}


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
            encoder_dtype=config.encoder_dtype,
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


def _setup(config: ml_collections.ConfigDict, workdir: Path):
    bert_config, bert_params, folder = bert.load_pretrained(config.encoder)
    return bert_config, bert_params, load_tokenizer(folder)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    check(config)  # bad values fail here, not after tokenizing 50,000 reviews
    workdir = Path(workdir)
    loop.save_run_config(workdir, config)
    bert_config, bert_params, tokenizer = _setup(config, workdir)
    data = prepare_data(config, tokenizer, workdir)
    features = cache_features(config, data, bert_config, bert_params, tokenizer)
    task = SentimentTask(config, data, bert_config, bert_params, features)
    history = loop.train_and_evaluate(task, config, workdir)
    if history["status"] != "done":
        return history
    if not config.read_test:
        print(
            "test set not read (read_test=False): compare runs on valid, then run the chosen "
            "one's command again with --set read_test=True to read it once"
        )
        return history
    params_like = task.init_params(jax.random.key(0))
    ckpt = checkpoints.Checkpoints(workdir / "checkpoints")
    best, meta = ckpt.restore_best_params(params_like)
    test = loop.evaluate(task, best, "test")
    final = {
        "best_checkpoint": meta,
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "test_count": test["count"],
    }
    loop.write_json_atomic(workdir / "results.json", final)
    print(
        f"test accuracy of the best-valid model: {100 * test['accuracy']:.2f}% "
        f"on {test['count']} reviews"
    )
    return history | {"final": final}


def predict(workdir: str | Path, texts: list[str]) -> list[float]:
    """P(positive) for each text, from the best checkpoint in ``workdir``."""
    return [row["p_positive"] for row in predict_reviews(workdir, texts)]


def predict_reviews(workdir: str | Path, texts: list[str]) -> list[dict[str, Any]]:
    """For each text: ``p_positive`` from the best checkpoint in ``workdir``, ``tokens`` (word
    pieces with [CLS] and [SEP], before cutting) and ``truncated`` (cut to ``max_length``)."""
    workdir = Path(workdir)
    if not texts or any(not t.strip() for t in texts):
        raise ValueError("give at least one non-empty text to predict.")
    config = loop.load_run_config(workdir, "hw2jax sentiment train", marker="encoder")
    if "encoder_attention" in config:  # saved under the attention path's earlier name
        old = config.encoder_attention
        del config["encoder_attention"]
        config["encoder_implementation"] = {"fused": "fused_cpu"}.get(old, old)
    for key, default in (("encoder_implementation", "auto"), ("pool", "final")):
        if key not in config:  # saved before the option existed
            config[key] = default
    bert_config, bert_params, tokenizer = _setup(config, workdir)
    model = build_model(config, bert_config)
    params_like = init_params(model, bert_params, jax.random.key(0))
    params, _ = checkpoints.Checkpoints(workdir / "checkpoints").restore_best_params(params_like)
    ids, lengths = imdb.tokenize(texts, tokenizer, config.max_length)
    full = [len(row) for row in tokenizer(list(texts), return_attention_mask=False)["input_ids"]]
    apply = jax.jit(lambda p, x: jax.nn.sigmoid(model.apply({"params": p}, x)))
    # One text at a time with no padding, as the assignment's predict_sentiment did: the
    # faithful (unmasked) model would otherwise see the padding.
    return [
        {
            "p_positive": float(apply(params, jnp.asarray(row[None, :n]))[0]),
            "tokens": n_full,
            "truncated": n_full > config.max_length,
            "max_length": config.max_length,
        }
        for row, n, n_full in zip(ids, lengths, full, strict=True)
    ]
