"""A small causal language model for multi-query associative recall (MQAR), one attention
variant per model: the Zoology study's setting (Arora et al. 2023), scaled to a CPU.

Every block is pre-norm: a short causal depthwise convolution (the token shift that lets a value
position carry its key, as in Zoology's baselines), the sequence mixer, then an MLP.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hw2jax.attention import registry
from hw2jax.errors import InputError


def mixer_options(kind: str, head_dim: int) -> dict:
    """The options a mixer runs with here: the registry's defaults, but Performer's features
    sized to 2 x head_dim, so that its state is of the other linear forms' order."""
    return {"num_features": 2 * head_dim} if kind == "performer" else {}


def state_size(mixer: str, dim: int, heads: int, seq_len: int) -> int:
    """Floats a layer's mixer carries from one step to the next when generating: the key and
    value cache for softmax, the recurrent state (and normaliser) for the others."""
    head_dim = dim // heads
    variant = registry.get(mixer)
    per_head = variant.floats_per_head(head_dim, seq_len, **mixer_options(mixer, head_dim))
    if per_head is None:
        raise registry.VariantError(
            f"attention {mixer!r} registers no state_size; MQAR's table needs one."
        )
    return heads * per_head


class Mixer(nn.Module):
    dim: int
    heads: int
    kind: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        q, k, v = jnp.split(nn.Dense(3 * self.dim, name="qkv")(x), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.heads, self.dim // self.heads) for a in (q, k, v))
        variant = registry.get(self.kind)
        gates = {}
        if "log_alpha" in variant.gates:
            # GLA's gates: a low-rank projection, log-sigmoid, temperature 16 (Yang et al. 2024).
            gate = nn.Dense(self.dim, name="gate")(nn.Dense(16, name="gate_low_rank")(x))
            gates["log_alpha"] = jax.nn.log_sigmoid(gate).reshape(k.shape) / 16.0
        if "head_log_alpha" in variant.gates:  # one decay per head, the same temperature
            gates["head_log_alpha"] = jax.nn.log_sigmoid(nn.Dense(self.heads, name="decay")(x)) / 16
        if "beta" in variant.gates:  # DeltaNet's write strength: a sigmoid per head
            gates["beta"] = jax.nn.sigmoid(nn.Dense(self.heads, name="beta")(x))
        options = mixer_options(self.kind, q.shape[-1])
        mixed = variant.bind(causal=True, **options)(q, k, v, **gates)
        if not variant.normalised:
            # Un-normalised sums (retention, GLA): each head's output is normed, as RetNet and
            # GLA do (group norm).
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
        registry.get(self.mixer).require(causal=True)
        if self.dim % self.heads:
            raise InputError(f"dim {self.dim} must be a multiple of heads {self.heads}.")
        x = nn.Embed(self.vocab_size, self.dim, name="embed")(tokens)
        for i in range(self.depth):
            x = Block(self.dim, self.heads, self.mixer, name=f"block{i}")(x)
        return nn.Dense(self.vocab_size, name="readout")(nn.LayerNorm(name="norm")(x))
