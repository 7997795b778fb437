"""Vision Transformer (lucidrains-style, as in the assignment) in Flax linen."""

from __future__ import annotations

import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from hw2jax import attention
from hw2jax.attention import registry
from hw2jax.errors import InputError
from hw2jax.models.layers import (
    LayerNorm,
    TorchDense,
    TorchKernel,
    bf16_step_options,
    dense_dot,
)


class Attention(nn.Module):
    """Multi-head attention with lucidrains' parameters (one ``to_qkv`` kernel, ``to_out``).

    ``merge`` (softmax only; ``None``: when ``dim <= dim_head``, as in the assignment) computes
    the same function with the products regrouped: head h's scores are
    ``x (Wq_h Wk_h^T) x^T`` and its output ``softmax(.) x (Wv_h Wout_h)``, so q, k and v are never
    formed and with the heads stacked along the token axis every product is one batch-leading
    matmul: no ``[b n h d] <-> [b h n d]`` copies (a quarter of the CPU training step) and, when
    dim <= dim_head, fewer FLOPs. Results differ from the direct form only by float rounding.
    """

    dim: int
    heads: int
    dim_head: int
    kind: str = "softmax"  # a registered attention variant (hw2jax.attention.registry)
    dtype: jnp.dtype | None = None
    merge: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, first_only: bool = False) -> jax.Array:
        """``first_only``: the output for the first token alone ([b, 1, dim]), attending to all."""
        inner = self.heads * self.dim_head
        to_qkv = TorchKernel(3 * inner, self.dim, name="to_qkv")()  # [dim, (three h d)]
        merge = self.dim <= self.dim_head if self.merge is None else self.merge
        if self.kind == "softmax" and merge:
            w_out, b_out = TorchKernel(self.dim, inner, use_bias=True, name="to_out")()
            w = to_qkv.reshape(self.dim, 3, self.heads, self.dim_head)
            w_out = w_out.reshape(self.heads, self.dim_head, -1)
            return self._merged_softmax(x, w, w_out, first_only) + b_out
        qkv = _dot(x, to_qkv, self.dtype)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b n h d", three=3, h=self.heads)
        out = registry.get(self.kind).bind(causal=False)(q, k, v)
        out = rearrange(out[:, :1] if first_only else out, "b n h d -> b n (h d)")
        return TorchDense(self.dim, inner, dtype=self.dtype, name="to_out")(out)

    def _merged_softmax(
        self, x: jax.Array, w: jax.Array, w_out: jax.Array, first_only: bool
    ) -> jax.Array:
        """x [b, n, c]; w [c, three, h, d]; w_out [h, d, c]."""
        b, _, c = x.shape
        queries = x[:, :1] if first_only else x
        n = queries.shape[1]
        scale = 1.0 / math.sqrt(self.dim_head)
        # [c, (h c')]: column block h is Wq_h Wk_h^T / sqrt(d).
        qk = jnp.einsum("chd,ehd->che", w[:, 0] * scale, w[:, 1]).reshape(c, self.heads * c)
        # [b, n, (h c)] viewed as [b, (n h), c]: one row per token and head, no copy.
        u = _dot(queries, qk, self.dtype).reshape(b, n * self.heads, c)
        # [b, (n h), c]: each token's heads against the n tokens (few: a fused kernel on CPU).
        mixed = attention.few_keys_attention(*_cast(self.dtype, u, x))
        vo = jnp.einsum("chd,hde->hce", w[:, 2], w_out).reshape(self.heads * c, -1)
        return _dot(mixed.reshape(b, n, self.heads * c), vo, self.dtype)


def xla_compiler_options(dtype: jnp.dtype | None, machine=None) -> dict[str, str]:
    """Options for ``jax.jit(..., compiler_options=...)`` of a ViT step. With bf16 compute whose
    products run on AMX tiles, XLA's own loops beat its YNNPACK fusions on what is left (layer
    norms, softmax, casts): 1,051-1,084 against 975-1,000 images/s a step, five processes each
    (benchmarks/results/amx_fused/). On AVX512-BF16 pair dots YNNPACK stays: 1,213 against
    1,140 images/s without it on the Zen 4 EPYC (benchmarks/results/zen4/pair_dots/). In
    float32, where the products are XLA's, YNNPACK is the faster one (497 against 533-539
    images/s), so this is per step, not a process-wide XLA_FLAGS."""
    return bf16_step_options(dtype, machine)


def _cast(dtype: jnp.dtype | None, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    return arrays if dtype is None else tuple(a.astype(dtype) for a in arrays)


def _dot(x: jax.Array, kernel: jax.Array, dtype: jnp.dtype | None) -> jax.Array:
    """x @ kernel over x's last axis, as TorchDense computes it (float32 out)."""
    return dense_dot(*_cast(dtype, x, kernel))


class FeedForward(nn.Module):
    dim: int
    hidden: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(TorchDense(self.hidden, self.dim, dtype=self.dtype, name="fc1")(x))
        return TorchDense(self.dim, self.hidden, dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
    """Pre-norm: x + Attn(LN(x)), then x + MLP(LN(x))."""

    dim: int
    heads: int
    dim_head: int
    mlp_dim: int
    attention: str = "softmax"  # a registered variant with a bidirectional form
    dtype: jnp.dtype | None = None
    merged_attention: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, first_only: bool = False) -> jax.Array:
        """``first_only``: the first token's row alone, [b, 1, dim] (it attends to all)."""
        ln = lambda name: LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)  # noqa: E731
        mixed = Attention(
            self.dim,
            self.heads,
            self.dim_head,
            self.attention,
            self.dtype,
            self.merged_attention,
            name="attn",
        )(ln("norm1")(x), first_only)
        x = (x[:, :1] if first_only else x) + mixed
        return x + FeedForward(self.dim, self.mlp_dim, self.dtype, name="mlp")(ln("norm2")(x))


class ViT(nn.Module):
    num_classes: int = 10
    image_size: int = 28
    patch_size: int = 4
    channels: int = 1
    dim: int = 64
    depth: int = 6
    heads: int = 4
    dim_head: int = 64
    mlp_dim: int = 128
    pool: Literal["cls", "mean"] = "cls"
    attention: str = "softmax"  # a registered variant with a bidirectional form
    dtype: jnp.dtype | None = None  # compute dtype; parameters stay float32
    merged_attention: bool | None = None  # see Attention.merge; None: when dim <= dim_head

    def _check(self, images: jax.Array) -> None:
        if self.image_size % self.patch_size:
            raise InputError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
                f"pick a patch size that divides it (e.g. 4 or 7 for 28)."
            )
        if self.pool not in ("cls", "mean"):
            raise InputError(f"pool must be 'cls' or 'mean', got {self.pool!r}.")
        registry.get(self.attention).require(causal=False)
        expected = (self.image_size, self.image_size, self.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise InputError(
                f"expected images of shape [batch, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(NHWC), got {tuple(images.shape)}. Add a channel axis with x[..., None] or "
                f"transpose NCHW input with x.transpose(0, 2, 3, 1)."
            )

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        self._check(images)
        p = self.patch_size
        patch_dim = p * p * self.channels
        x = rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)
        x = TorchDense(self.dim, patch_dim, dtype=self.dtype, name="patch_embedding")(x)
        b, n, _ = x.shape
        cls = self.param("cls_token", nn.initializers.normal(1.0), (1, 1, self.dim))
        pos = self.param("pos_embedding", nn.initializers.normal(1.0), (1, n + 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)).astype(x.dtype), x], axis=1)
        x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            # cls pooling reads only the first token, so the last block computes only its row:
            # the same logits, a sixth less work for 6 blocks (torch's model computes all rows).
            first_only = self.pool == "cls" and i == self.depth - 1
            x = Block(
                self.dim,
                self.heads,
                self.dim_head,
                self.mlp_dim,
                self.attention,
                self.dtype,
                self.merged_attention,
                name=f"block{i}",
            )(x, first_only)
        x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        x = LayerNorm(epsilon=1e-5, dtype=self.dtype, name="head_norm")(x)
        logits = TorchDense(self.num_classes, self.dim, dtype=self.dtype, name="head")(x)
        return logits.astype(jnp.float32)
