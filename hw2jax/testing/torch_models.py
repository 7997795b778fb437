"""PyTorch twins of our models, written independently, for parity tests and peer benchmarks.

Imports torch at the top: reach it through hw2jax.testing, which loads it on first use.
"""

import numpy as np
import torch

tnn = torch.nn


class TorchViT(tnn.Module):
    """The assignment's lucidrains-style ViT; input NCHW."""

    def __init__(
        self, image_size, patch_size, channels, dim, depth, heads, dim_head, mlp_dim, num_classes=10
    ):
        super().__init__()
        self.p, self.heads = patch_size, heads
        n = (image_size // patch_size) ** 2
        inner = heads * dim_head
        self.scale = dim_head**-0.5
        self.patch = tnn.Linear(patch_size * patch_size * channels, dim)
        self.cls = tnn.Parameter(torch.randn(1, 1, dim))
        self.pos = tnn.Parameter(torch.randn(1, n + 1, dim))
        self.layers = tnn.ModuleList(
            tnn.ModuleDict(
                dict(
                    norm1=tnn.LayerNorm(dim),
                    qkv=tnn.Linear(dim, 3 * inner, bias=False),
                    out=tnn.Linear(inner, dim),
                    norm2=tnn.LayerNorm(dim),
                    fc1=tnn.Linear(dim, mlp_dim),
                    fc2=tnn.Linear(mlp_dim, dim),
                )
            )
            for _ in range(depth)
        )
        self.head_norm, self.head = tnn.LayerNorm(dim), tnn.Linear(dim, num_classes)

    def forward(self, img):  # img: NCHW
        b, c, hh, ww = img.shape
        p = self.p
        x = img.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1)
        x = self.patch(x.reshape(b, (hh // p) * (ww // p), p * p * c))
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos
        for layer in self.layers:
            h = layer["norm1"](x)
            q, k, v = layer["qkv"](h).chunk(3, dim=-1)
            q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
            attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
            x = x + layer["out"]((attn @ v).transpose(1, 2).reshape(b, x.shape[1], -1))
            x = x + layer["fc2"](torch.relu(layer["fc1"](layer["norm2"](x))))
        return self.head(self.head_norm(x[:, 0]))


def copy_vit_params_to_torch(params, tmodel) -> None:
    """Copies Flax ViT params into a TorchViT (Dense kernels are transposed)."""

    def t(a):
        return torch.tensor(np.asarray(a))

    def dense(mod, p):
        mod.weight.copy_(t(p["kernel"]).T)
        if p.get("bias") is not None:
            mod.bias.copy_(t(p["bias"]))

    def norm(mod, p):
        mod.weight.copy_(t(p["scale"]))
        mod.bias.copy_(t(p["bias"]))

    with torch.no_grad():
        dense(tmodel.patch, params["patch_embedding"])
        tmodel.cls.copy_(t(params["cls_token"]))
        tmodel.pos.copy_(t(params["pos_embedding"]))
        for i, layer in enumerate(tmodel.layers):
            p = params[f"block{i}"]
            norm(layer["norm1"], p["norm1"])
            norm(layer["norm2"], p["norm2"])
            dense(layer["qkv"], p["attn"]["to_qkv"])
            dense(layer["out"], p["attn"]["to_out"])
            dense(layer["fc1"], p["mlp"]["fc1"])
            dense(layer["fc2"], p["mlp"]["fc2"])
        norm(tmodel.head_norm, params["head_norm"])
        dense(tmodel.head, params["head"])
