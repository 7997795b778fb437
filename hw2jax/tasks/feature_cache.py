"""Frozen-encoder outputs on disk, in shards that each commit atomically.

A split's features live in one folder named by their content (encoder weights, tokenizer, max
length, dtypes, masking, buckets and the split's token ids), under a cache dir that every work dir
shares (``~/.cache/hw2jax/features`` unless told otherwise): a second experiment with the same
encoder and data encodes nothing. Each shard of ``shard_size`` reviews is written to a temporary
name and renamed, its CRC-32 in its name: a build killed with kill -9 goes on from the last whole
shard, and a truncated or garbled shard is found on load and rebuilt alone.

Each review is stored at its own bucket length (padding positions included, as the encoder saw
them). Caching runs the encoder once in inference mode, so BERT's training dropout is not
applied; with the unmasked (faithful) model a review's padding positions come from its own
bucket, and in a batch padded further they are zeros.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

DEFAULT_DIR = Path.home() / ".cache" / "hw2jax" / "features"
_SHARD = re.compile(r"shard-(\d{5})-([0-9a-f]{8})\.bin")


def params_digest(params) -> str:
    """A digest of a parameter tree's values (the encoder's weights), in a fixed order."""
    h = hashlib.sha256()
    for path, leaf in sorted(
        jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0])
    ):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:16]


def content_key(**parts) -> str:
    """A short digest of named parts (strings, numbers, arrays) for a cache folder's name."""
    h = hashlib.sha256()
    for name in sorted(parts):
        value = parts[name]
        h.update(name.encode() + b"=")
        if isinstance(value, np.ndarray):
            h.update(str((value.dtype, value.shape)).encode())
            h.update(np.ascontiguousarray(value).tobytes())
        else:
            h.update(repr(value).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _crc32(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


class FeatureCache:
    """One split's features: ``folder/shard-KKKKK-<crc32>.bin`` for reviews [K*S, (K+1)*S)."""

    def __init__(self, folder: Path, stored: np.ndarray, hidden: int, dtype: str, shard_size: int):
        self.folder, self.stored, self.hidden = Path(folder), stored, hidden
        self.dtype, self.shard_size = jnp.dtype(dtype), shard_size
        self.n_shards = -(-len(stored) // shard_size)
        self._offsets = [
            np.concatenate([[0], np.cumsum(stored[self._rows(k).start : self._rows(k).stop])])
            for k in range(self.n_shards)
        ]  # each review's first row within its shard
        self._open: dict[int, np.memmap] = {}

    def _rows(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, len(self.stored)))

    def _nbytes(self, k: int) -> int:
        return int(self._offsets[k][-1]) * self.hidden * self.dtype.itemsize

    def _files(self) -> dict[int, list[tuple[Path, str]]]:
        found: dict[int, list[tuple[Path, str]]] = {}
        for path in self.folder.glob("shard-*.bin"):
            m = _SHARD.fullmatch(path.name)
            if m:
                found.setdefault(int(m.group(1)), []).append((path, m.group(2)))
        return found

    def _check(self, k: int, files: list[tuple[Path, str]]) -> tuple[Path | None, str | None]:
        """(the shard's file, None) when whole, else (None, why not; None if never written)."""
        problem = None
        for path, crc in files:
            size = path.stat().st_size
            if size != self._nbytes(k):
                problem = f"{size} bytes where {self._nbytes(k)} belong: truncated"
            elif f"{_crc32(path):08x}" != crc:
                problem = "its bytes do not match their CRC-32: garbled"
            else:
                return path, None
        return None, problem

    def _write(self, k: int, block: np.ndarray) -> None:
        data = np.ascontiguousarray(block.astype(self.dtype)).tobytes()
        final = self.folder / f"shard-{k:05d}-{zlib.crc32(data):08x}.bin"
        with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".tmp-", delete=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, final)  # the shard appears whole or not at all

    @classmethod
    def build(
        cls,
        folder: Path,
        encode: Callable[[jax.Array], jax.Array],
        ids: np.ndarray,
        lengths: np.ndarray,
        buckets: tuple[int, ...],
        hidden: int,
        dtype: str,
        batch_size: int,
        shard_size: int = 1024,
        progress: bool = False,
        desc: str = "features",
    ) -> FeatureCache:
        """The cache in ``folder``, encoding only the shards that are missing or damaged."""
        stored = np.array([min(b for b in buckets if b >= n) for n in lengths], np.int64)
        cache = cls(folder, stored, hidden, dtype, shard_size)
        cache.folder.mkdir(parents=True, exist_ok=True)
        files, todo = cache._files(), []
        for k in range(cache.n_shards):
            path, problem = cache._check(k, files.get(k, []))
            for stale, _ in files.get(k, []):
                if stale != path:
                    stale.unlink(missing_ok=True)
            if problem:
                print(
                    f"{desc}: shard {k} in {cache.folder} is damaged ({problem}); rebuilding it.",
                    file=sys.stderr,
                )
            if path is None:
                todo.append(k)
        if len(todo) < cache.n_shards:
            print(
                f"{desc}: {cache.n_shards - len(todo)} of {cache.n_shards} shards already in "
                f"{cache.folder}",
                file=sys.stderr,
            )
        bar = tqdm(
            total=sum(len(cache._rows(k)) for k in todo),
            desc=desc,
            unit="review",
            disable=not progress,
        )
        for k in todo:
            rows, offsets = np.arange(cache._rows(k).start, cache._rows(k).stop), cache._offsets[k]
            out = np.zeros((int(offsets[-1]), hidden), cache.dtype)
            for size in buckets:  # one program per bucket length
                in_bucket = np.flatnonzero(stored[rows] == size)
                for start in range(0, len(in_bucket), batch_size):
                    local = in_bucket[start : start + batch_size]
                    block = np.zeros((batch_size, size), ids.dtype)
                    block[: len(local)] = ids[rows[local], :size]
                    feats = np.asarray(encode(jnp.asarray(block)).astype(cache.dtype))
                    for i, f in zip(local, feats[: len(local)], strict=True):
                        out[offsets[i] : offsets[i + 1]] = f
                    bar.update(len(local))
            cache._write(k, out)
        bar.close()
        (cache.folder / "meta.json").write_text(
            json.dumps(
                {
                    "reviews": len(stored),
                    "shard_size": shard_size,
                    "hidden": hidden,
                    "dtype": cache.dtype.name,
                }
            )
        )
        return cache

    def nbytes(self) -> int:
        return sum(self._nbytes(k) for k in range(self.n_shards))

    def _shard(self, k: int) -> np.memmap:
        if k not in self._open:
            (path,) = [p for p, _ in self._files()[k]]
            shape = (int(self._offsets[k][-1]), self.hidden)
            self._open[k] = np.memmap(path, dtype=self.dtype, mode="r", shape=shape)
        return self._open[k]

    def gather(self, rows: np.ndarray, seq_len: int, batch_size: int) -> np.ndarray:
        out = np.zeros((batch_size, seq_len, self.hidden), self.dtype)
        for b, r in enumerate(rows):
            k, i = divmod(int(r), self.shard_size)
            start = int(self._offsets[k][i])
            n = min(int(self.stored[r]), seq_len)
            out[b, :n] = self._shard(k)[start : start + n]
        return out
