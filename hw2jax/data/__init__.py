"""Datasets behind one interface: ``DataSource.load(split) -> dict of arrays``."""

from hw2jax.data.idx import IdxFormatError, read_idx, write_idx
from hw2jax.data.sources import DataFormatError, DataNotFoundError, DataSource, TfdsSource

__all__ = [
    "DataFormatError",
    "DataNotFoundError",
    "DataSource",
    "IdxFormatError",
    "TfdsSource",
    "read_idx",
    "write_idx",
]
