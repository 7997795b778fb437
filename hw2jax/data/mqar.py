"""Multi-query associative recall (Arora et al. 2023, the Zoology study), generated.

A sequence opens with ``num_pairs`` key-value pairs, k1 v1 k2 v2 ..., and every position after
them is a query: one of those keys again, whose target is the value it was paired with. Keys come
from the lower half of the vocabulary and values from the upper half; token 0 is never used.
Targets are -1 where nothing is asked (the pairs themselves).
"""

from __future__ import annotations

import numpy as np

from hw2jax.errors import InputError


def check_sizes(seq_len: int, num_pairs: int, vocab_size: int) -> None:
    if num_pairs < 1 or 2 * num_pairs >= seq_len:
        raise InputError(
            f"num_pairs {num_pairs} must be at least 1 and leave room for queries in "
            f"seq_len {seq_len} (2 * num_pairs < seq_len)."
        )
    if vocab_size // 2 - 1 < num_pairs:
        raise InputError(
            f"vocab_size {vocab_size} has {vocab_size // 2 - 1} keys for {num_pairs} distinct "
            f"keys per sequence; use vocab_size >= {2 * num_pairs + 2}."
        )


def make_mqar(
    count: int, seq_len: int, num_pairs: int, vocab_size: int, seed: int
) -> dict[str, np.ndarray]:
    """``count`` sequences: {"tokens", "targets"}, each int32 [count, seq_len]."""
    check_sizes(seq_len, num_pairs, vocab_size)
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    keys = np.argsort(rng.random((count, half - 1)), axis=1)[:, :num_pairs] + 1
    values = rng.integers(half, vocab_size, (count, num_pairs))
    tokens = np.zeros((count, seq_len), np.int32)
    targets = np.full((count, seq_len), -1, np.int32)
    tokens[:, 0 : 2 * num_pairs : 2] = keys
    tokens[:, 1 : 2 * num_pairs : 2] = values
    asked = rng.integers(0, num_pairs, (count, seq_len - 2 * num_pairs))
    rows = np.arange(count)[:, None]
    tokens[:, 2 * num_pairs :] = keys[rows, asked]
    targets[:, 2 * num_pairs :] = values[rows, asked]
    return {"tokens": tokens, "targets": targets}
