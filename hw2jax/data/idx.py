"""Reader for the idx format of (Fashion-)MNIST, gzipped or not, with validation."""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from hw2jax.data.sources import DataFormatError

# The third magic byte gives the element type; (Fashion-)MNIST only uses unsigned bytes.
_UBYTE = 0x08


class IdxFormatError(DataFormatError):
    """An idx file is truncated, has the wrong magic number, or the wrong shape."""


def read_idx(
    path: str | os.PathLike, expect_shape: tuple[int | None, ...] | None = None
) -> np.ndarray:
    """Reads an idx file (``.gz`` or raw) into a uint8 array.

    ``expect_shape`` checks the dimensions; ``None`` entries match any size.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # bad header or CRC, cut, bad deflate data
            raise IdxFormatError(
                f"{path}: corrupt gzip stream ({e}); download the file again."
            ) from e
    if len(data) < 4:
        raise IdxFormatError(f"{path}: {len(data)} bytes is too short for an idx header.")
    zero1, zero2, dtype, ndim = data[:4]
    if zero1 or zero2 or dtype != _UBYTE or not 1 <= ndim <= 4:
        raise IdxFormatError(
            f"{path}: bad magic number {data[:4].hex()}; an idx file of unsigned bytes starts with "
            f"0000080N (N = number of dims). Is this really an (uncompressed or gzipped) idx file?"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{path}: header truncated ({len(data)} bytes).")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_bytes = header + int(np.prod(shape))
    if len(data) != expected_bytes:
        raise IdxFormatError(
            f"{path}: header says shape {shape} ({expected_bytes} bytes) but the file has "
            f"{len(data)} bytes after decompression; it is truncated or corrupt."
        )
    if expect_shape is not None and (
        len(shape) != len(expect_shape)
        or any(e is not None and e != s for e, s in zip(expect_shape, shape, strict=False))
    ):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expect_shape) + ")"
        raise IdxFormatError(f"{path}: shape {shape}, expected {want}.")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Writes a uint8 array as idx (gzipped when the name ends in .gz). For tests and tools."""
    array = np.asarray(array, np.uint8)
    payload = (
        bytes([0, 0, _UBYTE, array.ndim])
        + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
        + array.tobytes()
    )
    path = os.fspath(path)
    if compress if compress is not None else path.endswith(".gz"):
        payload = gzip.compress(payload)
    with open(path, "wb") as f:
        f.write(payload)
