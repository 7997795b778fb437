"""What a sentiment config builds: the encoder and its tokenizer, the BERT + GRU model and its
params (fresh head, pretrained encoder under ``bert``)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from hw2jax import cpu
from hw2jax.attention import dispatch
from hw2jax.errors import InputError, MissingFileError
from hw2jax.models import bert
from hw2jax.models.layers import init_on_dummy
from hw2jax.models.sentiment import FROZEN_KEY, BertGRUSentiment


def load_encoder(config: ml_collections.ConfigDict) -> tuple[bert.BertConfig, Any, Any]:
    """The pretrained encoder named by ``config.encoder``: its config, params and tokenizer."""
    bert_config, bert_params, folder = bert.load_pretrained(config.encoder)
    return bert_config, bert_params, load_tokenizer(folder)


def load_tokenizer(folder: str | Path):
    """The encoder's fast tokenizer, from its folder (tokenizer.json or vocab.txt)."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return BertTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    if (folder / "vocab.txt").is_file():
        return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    raise MissingFileError(f"{folder} has neither tokenizer.json nor vocab.txt.")


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
        finetune=config.get("finetune", False),  # configs saved before fine-tuning existed
        remat=config.get("remat", False),
    )


def encoder_dtype_name(config: ml_collections.ConfigDict) -> str:
    """``config.encoder_dtype``, with ``"auto"`` resolved by :func:`resolve_encoder_dtype`."""
    return resolve_encoder_dtype(config)[0]


def resolve_encoder_dtype(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """``config.encoder_dtype`` and, for ``"auto"``, a line saying why it became what it did.
    On a CPU, auto times one encoder layer of this run's shape in float32 and in bf16, as the
    run computes it (with gradients when fine-tuning, with dropout where the run drops), once per
    machine, and takes bf16 only where it is the faster one
    (:func:`hw2jax.attention.dispatch.precision`); where nothing is timed, "bfloat16" where the
    device multiplies bf16 natively (a GPU or TPU, or a CPU with AVX512-BF16 or AMX) and
    "float32" elsewhere, as without those instructions bf16 products only add conversions."""
    name = config.encoder_dtype
    if name in ("float32", "bfloat16"):
        return name, ""
    if name != "auto":
        raise InputError(f"encoder_dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}.")
    backend = jax.default_backend()
    rule = "bfloat16" if cpu.native_bf16(backend) else "float32"
    finetune = config.get("finetune", False)

    def layer_paths() -> dispatch.Measure:
        bert_config = bert.BertConfig.from_json(
            bert.resolve_encoder(config.encoder) / "config.json"
        )
        return bert.precision_paths(
            bert_config,
            config.batch_size,
            config.max_length,
            dropout=config.bert_dropout,
            implementation=config.encoder_implementation,
        )

    name, ms = dispatch.precision(rule, layer_paths, gradient=finetune)
    if ms is not None:
        what = "with gradients " if finetune else ""
        return name, (
            f"encoder_dtype auto: {name}; one encoder layer {what}took "
            f"{ms['bfloat16']:.1f} ms in bfloat16 and {ms['float32']:.1f} ms in float32 here "
            "(bf16 only where it is the faster by more than 5 %)."
        )
    if backend != "cpu":
        return name, f"encoder_dtype auto: {name} on {backend}."
    has = "has" if rule == "bfloat16" else "has no"
    return name, f"encoder_dtype auto: {name}; this CPU {has} AVX512-BF16 or AMX (not timed)."


def encoder_dtype(config: ml_collections.ConfigDict) -> jnp.dtype | None:
    """The encoder's matmul input dtype (accumulation is float32 either way); None: float32."""
    name = encoder_dtype_name(config)
    return None if name == "float32" else jnp.dtype(name)


def init_params(model: BertGRUSentiment, bert_params: Any, rng: jax.Array) -> dict:
    """Fresh GRU/head params with the pretrained encoder under ``bert``."""
    return {**_fresh_head(model, rng), FROZEN_KEY: bert_params}


@functools.partial(jax.jit, static_argnums=0)
def _fresh_head(model: BertGRUSentiment, rng: jax.Array) -> dict:
    # Under jit: one compilation, where eager init compiles each initializer (~100) apart; the
    # encoder's random init, replaced by the pretrained one, is never computed.
    params = init_on_dummy(model, rng, jnp.ones((1, 8), jnp.int32))
    return {k: v for k, v in params.items() if k != FROZEN_KEY}
