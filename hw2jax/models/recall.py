"""A small causal language model for multi-query associative recall (MQAR), one attention
variant per model: the Zoology study's setting (Arora et al. 2023), scaled to a CPU.

Every block is pre-norm: a short causal depthwise convolution (the token shift that lets a value
position carry its key, as in Zoology's baselines), the sequence mixer, then an MLP.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from hw2jax import attention

MIXERS = ("softmax", "linear", "performer", "cosformer", "retention", "gla")


def retention_decays(heads: int) -> jax.Array:
    """RetNet's per-head decays, 1 - 2^(-5 - h)."""
    return 1.0 - 2.0 ** (-5.0 - jnp.arange(heads, dtype=jnp.float32))


def performer_features(head_dim: int) -> int:
    return 2 * head_dim


def state_size(mixer: str, dim: int, heads: int, seq_len: int) -> int:
    """Floats a layer's mixer carries from one step to the next when generating: the key and
    value cache for softmax, the recurrent state (and normaliser) for the others."""
    head_dim = dim // heads
    per_head = {
        "softmax": 2 * seq_len * head_dim,
        "linear": head_dim * (head_dim + 1),
        "performer": performer_features(head_dim) * (head_dim + 1),
        "cosformer": 2 * head_dim * (head_dim + 1),
        "retention": head_dim * head_dim,
        "gla": head_dim * head_dim,
    }[mixer]
    return heads * per_head


def _mixer(kind: str, heads: int) -> Callable:
    if kind == "softmax":
        return lambda q, k, v: attention.softmax_attention(q, k, v, causal=True)
    if kind == "linear":
        return lambda q, k, v: attention.linear_attention(q, k, v, causal=True)
    if kind == "performer":
        return lambda q, k, v: attention.performer_attention(
            q,
            k,
            v,
            causal=True,
            num_features=performer_features(q.shape[-1]),
            key=jax.random.key(0),
        )
    if kind == "cosformer":
        return lambda q, k, v: attention.cosformer_attention(q, k, v, causal=True)
    if kind == "retention":
        return lambda q, k, v: attention.retention(
            q / math.sqrt(q.shape[-1]), k, v, gamma=retention_decays(heads)
        )
    raise ValueError(f"unknown mixer {kind!r}; choose one of {', '.join(MIXERS)}.")


class Mixer(nn.Module):
    dim: int
    heads: int
    kind: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        q, k, v = jnp.split(nn.Dense(3 * self.dim, name="qkv")(x), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.heads, self.dim // self.heads) for a in (q, k, v))
        if self.kind == "gla":
            # GLA's gates: a low-rank projection, log-sigmoid, temperature 16 (Yang et al. 2024).
            gate = nn.Dense(self.dim, name="gate")(nn.Dense(16, name="gate_low_rank")(x))
            log_alpha = jax.nn.log_sigmoid(gate).reshape(k.shape) / 16.0
            mixed = attention.gated_linear_attention(q / math.sqrt(q.shape[-1]), k, v, log_alpha)
        else:
            mixed = _mixer(self.kind, self.heads)(q, k, v)
        if self.kind in ("retention", "gla"):
            # Both are un-normalised sums; RetNet and GLA norm each head's output (group norm).
            mixed = nn.LayerNorm(name="head_norm")(mixed)
        return nn.Dense(self.dim, name="out")(mixed.reshape(b, t, self.dim))


class Block(nn.Module):
    dim: int
    heads: int
    kind: str
    conv_size: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.LayerNorm(name="norm1")(x)
        h = nn.Conv(
            self.dim,
            (self.conv_size,),
            padding=[(self.conv_size - 1, 0)],  # causal: step t sees t-3 .. t
            feature_group_count=self.dim,
            name="shift",
        )(h)
        x = x + Mixer(self.dim, self.heads, self.kind, name="mixer")(h)
        h = nn.LayerNorm(name="norm2")(x)
        h = nn.Dense(2 * self.dim, name="fc1")(h)
        return x + nn.Dense(self.dim, name="fc2")(nn.gelu(h))


class RecallLM(nn.Module):
    """Tokens [batch, T] -> next-token logits [batch, T, vocab]."""

    vocab_size: int
    dim: int = 64
    heads: int = 2
    depth: int = 2
    mixer: str = "softmax"

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.mixer not in MIXERS:
            raise ValueError(f"unknown mixer {self.mixer!r}; choose one of {', '.join(MIXERS)}.")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be a multiple of heads {self.heads}.")
        x = nn.Embed(self.vocab_size, self.dim, name="embed")(tokens)
        for i in range(self.depth):
            x = Block(self.dim, self.heads, self.mixer, name=f"block{i}")(x)
        return nn.Dense(self.vocab_size, name="readout")(nn.LayerNorm(name="norm")(x))
