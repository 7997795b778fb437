"""Test and benchmark helpers. Like ``numpy.testing``, importing this package is cheap: the
PyTorch twins load torch (a test extra, not a runtime dependency) on first use.

``TorchViT`` and ``copy_vit_params_to_torch`` come from :mod:`hw2jax.testing.torch_models`.
"""

from __future__ import annotations

import importlib

_TORCH_NAMES = ("TorchViT", "copy_vit_params_to_torch")
__all__ = list(_TORCH_NAMES)


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        try:
            module = importlib.import_module("hw2jax.testing.torch_models")
        except ImportError as e:
            raise ImportError(
                f"hw2jax.testing.{name} needs PyTorch: pip install 'hw2jax[test]' "
                "(CPU build: pip install torch==2.13.0)."
            ) from e
        return getattr(module, name)
    raise AttributeError(f"module 'hw2jax.testing' has no attribute {name!r}")
