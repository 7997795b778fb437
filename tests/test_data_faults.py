"""Damaged data files: every decompression or format error of the idx and tar readers becomes
the project's own DataFormatError, naming the file; nothing from zlib, gzip or tarfile leaks."""

import io
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hw2jax.data import DataFormatError, IdxFormatError, read_idx, write_idx
from hw2jax.data.imdb import AclImdbSource

FIXTURE = Path(__file__).parent / "fixtures" / "aclImdb"


def _idx_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "images-idx3-ubyte.gz"
        write_idx(path, np.random.default_rng(0).integers(0, 255, (20, 28, 28)))
        return path.read_bytes()


def _tar_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(FIXTURE, arcname="aclImdb")
    return buffer.getvalue()


IDX, TAR = _idx_bytes(), _tar_bytes()


def _damage(data: bytes, draw) -> bytes:
    """Flips 1-8 bytes at random places, or cuts the file short."""
    if draw(st.booleans()):
        return data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(out) - 1))
        out[i] ^= draw(st.integers(1, 255))
    return bytes(out)


def _load(data: bytes, name: str, load):
    """(the DataFormatError, None) or (None, what ``load`` read)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        try:
            return None, load(path)
        except DataFormatError as e:
            assert name in str(e)  # names the file
            return e, None


def _read_idx(path):
    return read_idx(path, (None, 28, 28))


def _read_imdb(path):
    return AclImdbSource(path).load_all()


def _same_reviews(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[split].keys() == b[split].keys()
        and all(np.array_equal(a[split][k], b[split][k]) for k in a[split])
        for split in a
    )


IDX_READ = _load(IDX, "images-idx3-ubyte.gz", _read_idx)[1]
TAR_READ = _load(TAR, "aclImdb_v1.tar.gz", _read_imdb)[1]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_damaged_idx_files_give_only_idx_errors(data):
    damaged = _damage(IDX, data.draw)
    error, images = _load(damaged, "images-idx3-ubyte.gz", _read_idx)
    assert isinstance(error, IdxFormatError) or np.array_equal(images, IDX_READ)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_damaged_imdb_tarballs_give_only_data_format_errors(data):
    damaged = _damage(TAR, data.draw)
    error, reviews = _load(damaged, "aclImdb_v1.tar.gz", _read_imdb)
    # A load that succeeds (damage to gzip header fields) reads exactly the undamaged reviews.
    assert error is not None or _same_reviews(reviews, TAR_READ)


def test_flipped_bytes_in_the_deflate_stream_name_the_file(tmp_path):
    data = bytearray(IDX)
    data[10] ^= 0xFF  # the first deflate block header: zlib.error "invalid block type"
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(IdxFormatError, match=r"t10k-images-idx3-ubyte\.gz: corrupt gzip stream"):
        read_idx(path)


def test_a_tarball_cut_in_half_is_a_clear_error(tmp_path):
    path = tmp_path / "aclImdb_v1.tar.gz"
    path.write_bytes(TAR[: len(TAR) // 2])
    with pytest.raises(DataFormatError, match=r"aclImdb_v1\.tar\.gz is not a readable tar .*again"):
        AclImdbSource(path).load_all()
