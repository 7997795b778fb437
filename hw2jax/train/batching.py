"""Batches gathered on the device from whole datasets that already live there."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Batch = dict[str, jax.Array]


def chunk(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive batches of ``order``; the last one may be partial."""
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class IndexBatches(Sequence):
    """Batch i holds rows ``batches[i]`` of ``arrays``, padded to ``batch_size`` rows with
    ``mask`` 0, so a partial batch counts exactly and compiles no new shape. Arrays named in
    ``seq_keys`` are cut to ``seq_lens[i]`` columns (length bucketing)."""

    def __init__(
        self,
        arrays: dict[str, jax.Array],
        batches: list[np.ndarray],
        batch_size: int,
        seq_lens: list[int] | None = None,
        seq_keys: tuple[str, ...] = (),
    ):
        self.arrays, self.batches, self.batch_size = arrays, batches, batch_size
        self.seq_lens, self.seq_keys = seq_lens, seq_keys

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < len(self.batches):
            raise IndexError(i)
        rows = self.batches[i]
        idx = np.zeros(self.batch_size, np.int32)
        idx[: len(rows)] = rows
        mask = (np.arange(self.batch_size) < len(rows)).astype(np.float32)
        seq_len = self.seq_lens[i] if self.seq_lens else None
        return _gather(self.arrays, jnp.asarray(idx), jnp.asarray(mask), seq_len, self.seq_keys)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _gather(arrays, idx, mask, seq_len, seq_keys):
    batch = {k: (v[idx, :seq_len] if k in seq_keys else v[idx]) for k, v in arrays.items()}
    batch["mask"] = mask
    return batch
