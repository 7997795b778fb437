"""Validation splits carved from a training split, the same for every run with one seed."""

from __future__ import annotations

import numpy as np

from hw2jax.errors import InputError


def train_valid_split(n: int, train_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of range(n) into ``train_size`` sorted indices and the rest."""
    if not 0 < train_size < n:
        raise InputError(f"train_size must be in 1..{n - 1}, got {train_size}.")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:train_size]), np.sort(order[train_size:])
