r"""ViT on FashionMNIST: a stronger recipe for the same model (499,722 parameters).

Command:   hw2jax vit train --config experiments/vit_fashion_mnist_strong.py \
             --workdir runs/vit_strong    # on a 2-core CPU add --host-devices 2 (~100 min there)
Target:    >= 91 % test accuracy in at most 30 epochs.
Measured:  90.99 % after 30 epochs (best epoch 29: 91.02 %), 74 s wall on one H100 (2026-11-26,
           jax 0.11.2, float32; experiments/results/gpu_h100/). With --epochs 20: 90.04 % on 2 CPU
           cores (2026-11-26, --host-devices 2, 7,283 s as run with the cores shared;
           experiments/results/vit_fashion_mnist_strong/).

Changes from the assignment's recipe, each a standard fix for a small ViT trained from scratch on
a small dataset: AdamW (decoupled decay, none on biases and norms) with linear warm-up and cosine
decay, label smoothing 0.1, and light augmentation (random shifts of up to 2 pixels and
horizontal flips; FashionMNIST items are left-right symmetric enough for flips to be safe).
"""

import importlib.util
from pathlib import Path

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    # Start from the assignment's config, so the two differ only where stated here.
    path = Path(__file__).with_name("vit_fashion_mnist.py")
    spec = importlib.util.spec_from_file_location("vit_fashion_mnist", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.epochs = 30
    c.optimizer = "adamw"
    c.learning_rate = 2e-3
    c.weight_decay = 0.05
    c.schedule = "warmup_cosine"
    c.warmup_epochs = 2.0
    c.grad_clip_norm = 1.0
    c.label_smoothing = 0.1
    c.augment_pad = 2
    c.augment_flip = True
    return c
