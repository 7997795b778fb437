"""P(positive) for new reviews from a trained work dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from hw2jax.data import imdb
from hw2jax.errors import InputError
from hw2jax.tasks.sentiment.model import build_model, init_params, load_encoder
from hw2jax.train import checkpoints, run_files


def predict(workdir: str | Path, texts: list[str]) -> list[float]:
    """P(positive) for each text, from the best checkpoint in ``workdir``."""
    return [row["p_positive"] for row in predict_reviews(workdir, texts)]


def predict_reviews(workdir: str | Path, texts: list[str]) -> list[dict[str, Any]]:
    """For each text: ``p_positive`` from the best checkpoint in ``workdir``, ``tokens`` (word
    pieces with [CLS] and [SEP], before cutting) and ``truncated`` (cut to ``max_length``)."""
    workdir = Path(workdir)
    if not texts or any(not t.strip() for t in texts):
        raise InputError("give at least one non-empty text to predict.")
    config = run_files.load_run_config(workdir, "hw2jax sentiment train", marker="encoder")
    if "encoder_attention" in config:  # saved under the attention path's earlier name
        old = config.encoder_attention
        del config["encoder_attention"]
        config["encoder_implementation"] = {"fused": "fused_cpu"}.get(old, old)
    for key, default in (("encoder_implementation", "auto"), ("pool", "final"), ("tail_tokens", 0)):
        if key not in config:  # saved before the option existed
            config[key] = default
    bert_config, bert_params, tokenizer = load_encoder(config)
    model = build_model(config, bert_config)
    params_like = init_params(model, bert_params, jax.random.key(0))
    params, _ = checkpoints.Checkpoints(workdir / "checkpoints").restore_best_params(params_like)
    ids, lengths = imdb.tokenize(texts, tokenizer, config.max_length, None, config.tail_tokens)
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
