"""Frozen BERT -> 2-layer bidirectional GRU -> linear: the assignment's sentiment model."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hw2jax.errors import InputError
from hw2jax.models.bert import BertConfig, BertModel
from hw2jax.models.gru import GRU
from hw2jax.models.layers import TorchDense

FROZEN_KEY = "bert"
POOLS = ("final", "mean", "max")


class BertGRUSentiment(nn.Module):
    """Logits [B] for input ids [B, T].

    Faithful defaults: the original called BERT without an attention mask and ran the GRU
    over the padding (``use_mask=False``), and BERT's dropout was active while training
    because the module was in train mode (``bert_dropout=True``), although its weights were
    frozen. ``use_mask=True`` passes the mask to BERT and the true lengths to the GRU.
    ``pool`` picks what the linear layer reads, each of the same size: the assignment's
    ``"final"`` states of the top layer's two directions, or the ``"mean"`` or ``"max"`` of its
    outputs over the time steps (the real ones with ``use_mask``, else every step).
    """

    bert_config: BertConfig
    hidden_dim: int = 256
    n_layers: int = 2
    bidirectional: bool = True
    dropout: float = 0.25
    use_mask: bool = False
    bert_dropout: bool = True
    dtype: Any = None
    implementation: str = "auto"  # BertModel's attention: auto, xla or fused_cpu
    pool: str = "final"  # "final" | "mean" | "max"
    finetune: bool = False  # train the encoder too (its gradient flows); else it is frozen
    remat: bool = False  # BertModel.remat: recompute the encoder's layers in the backward pass

    def setup(self):
        if self.pool not in POOLS:
            raise InputError(f"pool must be one of {POOLS}, got {self.pool!r}.")
        self.bert = BertModel(self.bert_config, self.dtype, self.implementation, self.remat)
        self.rnn = GRU(self.hidden_dim, self.n_layers, self.bidirectional, self.dropout)
        self.head_dropout = nn.Dropout(self.dropout)
        fan_in = self.hidden_dim * (2 if self.bidirectional else 1)
        self.out = TorchDense(1, fan_in)

    def encode(self, input_ids, attention_mask=None, *, train: bool = False) -> jax.Array:
        """BERT's last hidden state [B, T, H]; with no gradient unless ``finetune``."""
        mask = attention_mask if self.use_mask else None
        hidden, _ = self.bert(input_ids, mask, deterministic=not (train and self.bert_dropout))
        return hidden if self.finetune else jax.lax.stop_gradient(hidden)

    def head(self, features, attention_mask, *, train: bool = False) -> jax.Array:
        """GRU -> pooled states -> dropout -> linear, on encoder features."""
        lengths = attention_mask.sum(-1) if self.use_mask else None
        outputs, h_n = self.rnn(features.astype(jnp.float32), lengths, deterministic=not train)
        if self.pool == "final":
            hidden = jnp.concatenate([h_n[-2], h_n[-1]], -1) if self.bidirectional else h_n[-1]
        else:
            steps = outputs.shape[1]
            valid = (
                jnp.arange(steps)[None, :] < lengths[:, None]
                if lengths is not None
                else jnp.ones(outputs.shape[:2], bool)
            )[..., None]
            if self.pool == "mean":
                hidden = jnp.sum(jnp.where(valid, outputs, 0.0), 1) / jnp.sum(valid, 1)
            else:
                hidden = jnp.max(jnp.where(valid, outputs, -jnp.inf), 1)
        hidden = self.head_dropout(hidden, deterministic=not train)
        return self.out(hidden)[..., 0].astype(jnp.float32)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        *,
        train: bool = False,
        features: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B]. ``features`` (cached encoder outputs) skips BERT."""
        if attention_mask is None:
            attention_mask = (input_ids != self.bert_config.pad_token_id).astype(jnp.int32)
        if features is None:
            features = self.encode(input_ids, attention_mask, train=train)
        return self.head(features, attention_mask, train=train)
