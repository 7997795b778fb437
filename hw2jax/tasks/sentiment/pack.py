"""A sentiment config's inputs in a few megabytes, for a machine that cannot download them:
the encoder's checkpoint folder and the reviews as token ids."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from hw2jax.data import imdb
from hw2jax.models import bert
from hw2jax.tasks.sentiment.data import tokenized_splits, vocab_digest
from hw2jax.tasks.sentiment.model import load_tokenizer
from hw2jax.tasks.sentiment.task import check


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
        tail_tokens=config.tail_tokens,
    )
    bert.save_pretrained(
        out / "encoder", bert_config, bert_params, tokenizer_from=folder, dtype=encoder_dtype
    )
    files = [out / imdb.PACK_NAME, *sorted((out / "encoder").iterdir())]
    return {str(f.relative_to(out)): f.stat().st_size for f in files}
