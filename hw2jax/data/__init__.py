"""Datasets behind one interface: ``DataSource.load(split) -> dict of arrays``."""

from hw2jax.data.idx import IdxFormatError, read_idx, write_idx
from hw2jax.data.sources import DataNotFoundError, DataSource, TfdsSource

__all__ = [
    "DataNotFoundError",
    "DataSource",
    "IdxFormatError",
    "TfdsSource",
    "read_idx",
    "write_idx",
]
