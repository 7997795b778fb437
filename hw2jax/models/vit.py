"""Vision Transformer (lucidrains-style, as in the assignment) in Flax linen."""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from hw2jax import attention
from hw2jax.models.layers import TorchDense


class Attention(nn.Module):
    dim: int
    heads: int
    dim_head: int
    kind: Literal["softmax", "linear"] = "softmax"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = self.heads * self.dim_head
        qkv = TorchDense(3 * inner, self.dim, use_bias=False, dtype=self.dtype, name="to_qkv")(x)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b n h d", three=3, h=self.heads)
        if self.kind == "softmax":
            out = attention.softmax_attention(q, k, v)
        else:
            out = attention.linear_attention(q, k, v)
        out = rearrange(out, "b n h d -> b n (h d)")
        return TorchDense(self.dim, inner, dtype=self.dtype, name="to_out")(out)


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
    attention: Literal["softmax", "linear"] = "softmax"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)  # noqa: E731
        x = x + Attention(self.dim, self.heads, self.dim_head, self.attention, self.dtype,
                          name="attn")(ln("norm1")(x))  # fmt: skip
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
    attention: Literal["softmax", "linear"] = "softmax"
    dtype: jnp.dtype | None = None  # compute dtype; parameters stay float32

    def _check(self, images: jax.Array) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
                f"pick a patch size that divides it (e.g. 4 or 7 for 28)."
            )
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}.")
        if self.attention not in ("softmax", "linear"):
            raise ValueError(f"attention must be 'softmax' or 'linear', got {self.attention!r}.")
        expected = (self.image_size, self.image_size, self.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
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
            x = Block(self.dim, self.heads, self.dim_head, self.mlp_dim, self.attention,
                      self.dtype, name=f"block{i}")(x)  # fmt: skip
        x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="head_norm")(x)
        logits = TorchDense(self.num_classes, self.dim, dtype=self.dtype, name="head")(x)
        return logits.astype(jnp.float32)
