"""IMDB reviews (Maas et al. 2011) from a local aclImdb folder or .tar.gz, TFDS, or a token
pack (reviews tokenized once, for machines that receive few megabytes); the seeded train/valid
split; batched tokenization cached to disk; length bucketing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from hw2jax.data.sources import (
    DataFormatError,
    DataNotFoundError,
    DataSource,
    TfdsSource,
    tfds_available,
)
from hw2jax.errors import InputError

ENV_VAR = "HW2JAX_DATA_DIR"
# Names the reviews go by inside a folder: the usual places, or a data root
# ($HW2JAX_DATA_DIR holding several datasets).
NAMES = ("aclImdb", "aclImdb_v1.tar.gz", "aclImdb_labeled.tar.gz")
USUAL_PLACES = tuple(Path.home() / ".cache" / "hw2jax" / name for name in NAMES)
_MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")


class ReviewError(DataFormatError):
    """A review is empty or not UTF-8."""


def _decode(raw: bytes, where: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ReviewError(
            f"{where} is not UTF-8 ({e.reason} at byte {e.start}); "
            "re-encode it with `iconv -t utf-8`."
        ) from None
    if not text.strip():
        raise ReviewError(f"{where} is empty; remove it or put the review text in it.")
    return text


class AclImdbSource:
    """The original layout, ``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt``, as a
    folder (the aclImdb folder or its parent) or as a .tar.gz. Unlabelled reviews are skipped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.description = f"aclImdb at {self.path}"

    def _files(self) -> Iterator[tuple[str, str, bytes]]:
        if self.path.is_file():
            try:
                with tarfile.open(self.path, "r:*") as tar:
                    for member in tar:
                        if member.isfile() and _MEMBER.search(member.name):
                            yield (
                                member.name,
                                f"{self.path}:{member.name}",
                                tar.extractfile(member).read(),
                            )
                    # tarfile stops at a header it cannot read as if the archive ended there:
                    # reading the stream to its end makes gzip check its CRC and length.
                    while tar.fileobj.read(1 << 20):
                        pass
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                # Not a tar, a damaged gzip stream (bad CRC or deflate data) or a cut download.
                raise DataFormatError(
                    f"{self.path} is not a readable tar archive ({type(e).__name__}: {e}); it is "
                    "damaged or cut short: download it again (aclImdb_v1.tar.gz, 84 MB) or give "
                    "the unpacked aclImdb folder."
                ) from None
            return
        root = self.path / "aclImdb" if (self.path / "aclImdb").is_dir() else self.path
        for split in ("train", "test"):
            for label in ("pos", "neg"):
                folder = root / split / label
                for f in sorted(folder.glob("*.txt")) if folder.is_dir() else ():
                    yield f"aclImdb/{split}/{label}/{f.name}", str(f), f.read_bytes()

    def load_all(self) -> dict[str, dict[str, np.ndarray]]:
        rows: dict[str, list] = {"train": [], "test": []}
        for name, where, raw in self._files():
            split, label, review_id, rating = _MEMBER.search(name).groups()
            rows[split].append((int(review_id), label == "pos", int(rating), _decode(raw, where)))
        for split, items in rows.items():
            if not items:
                raise DataNotFoundError(
                    f"{self.path} has no aclImdb/{split}/{{pos,neg}}/*.txt reviews; expected the "
                    "layout of the original aclImdb_v1.tar.gz."
                )
        out = {}
        for split, items in rows.items():
            items.sort(key=lambda r: (not r[1], r[0]))  # a fixed order: pos then neg, by id
            out[split] = {
                "text": np.array([r[3] for r in items], dtype=object),
                "label": np.array([int(r[1]) for r in items], np.int32),
            }
        return out

    def load(self, split: str) -> dict[str, np.ndarray]:
        if split not in ("train", "test"):
            raise InputError(f"unknown split {split!r}; aclImdb has 'train' and 'test'.")
        return self.load_all()[split]


PACK_NAME = "imdb_tokens.npz"
PACK_VERSION = 1


def save_token_pack(
    path: str | os.PathLike,
    splits: dict[str, dict[str, np.ndarray]],
    *,
    max_length: int,
    vocab_digest: str,
    tail_tokens: int = 0,
) -> Path:
    """Writes tokenized reviews ({split: ids [N, L], length [N], label [N]}) as one compressed
    .npz of uint16 word pieces, unpadded: IMDB at 512 tokens is ~20 MB instead of 120 MB of
    text and tokenizer. ``vocab_digest`` and ``max_length`` go in too, so a run with another
    tokenizer or length is refused (:class:`TokenPackSource`). Written atomically."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for split, a in splits.items():
        lengths = np.asarray(a["length"], np.int32)
        ids = np.asarray(a["ids"])
        flat = ids[np.arange(ids.shape[1])[None, :] < lengths[:, None]]  # row-major: review order
        if flat.size and (flat.min() < 0 or flat.max() >= 2**16):
            raise InputError("token ids must lie in 0..65535 to be packed as uint16.")
        arrays[f"{split}_tokens"] = flat.astype(np.uint16)
        arrays[f"{split}_length"] = lengths
        arrays[f"{split}_label"] = np.asarray(a["label"], np.int8)
    meta = {
        "version": PACK_VERSION,
        "max_length": max_length,
        "tail_tokens": tail_tokens,
        "vocab_digest": vocab_digest,
        "splits": sorted(splits),
    }
    arrays["meta"] = np.array(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


class TokenPackSource:
    """Reviews already tokenized by :func:`save_token_pack` (``hw2jax sentiment pack``):
    ``load(split)`` gives ``ids`` [N, max_length] (0-padded), ``length`` and ``label``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.description = f"token pack {self.path}"
        self._arrays: dict[str, np.ndarray] | None = None

    def _read(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            try:
                with np.load(self.path, allow_pickle=False) as f:
                    arrays = {k: f[k] for k in f.files}
                meta = json.loads(str(arrays["meta"]))
            except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
                raise DataFormatError(
                    f"{self.path} is not a readable token pack ({type(e).__name__}: {e}); it "
                    "is damaged or cut short: build it again with `hw2jax sentiment pack`."
                ) from None
            if meta.get("version") != PACK_VERSION:
                raise DataFormatError(
                    f"{self.path} is a token pack of version {meta.get('version')}, this hw2jax "
                    f"reads version {PACK_VERSION}: build it again with `hw2jax sentiment pack`."
                )
            self.meta, self._arrays = meta, arrays
        return self._arrays

    def check(self, *, max_length: int, vocab_digest: str, tail_tokens: int = 0) -> None:
        """Refuses a pack made for another tokenizer, length or cut, naming the fix."""
        self._read()
        if self.meta["vocab_digest"] != vocab_digest:
            raise DataFormatError(
                f"{self.path} was tokenized with another vocabulary than this encoder's: "
                "pack the reviews again with the same --encoder (`hw2jax sentiment pack`)."
            )
        if self.meta["max_length"] != max_length:
            raise DataFormatError(
                f"{self.path} holds reviews cut to {self.meta['max_length']} tokens and this "
                f"config has max_length={max_length}: set max_length="
                f"{self.meta['max_length']}, or pack again with --set max_length={max_length}."
            )
        packed_tail = self.meta.get("tail_tokens", 0)  # packs from before the option: 0
        if packed_tail != tail_tokens:
            raise DataFormatError(
                f"{self.path} holds long reviews cut with tail_tokens={packed_tail} and this "
                f"config has tail_tokens={tail_tokens}: set tail_tokens={packed_tail}, or pack "
                f"again with --set tail_tokens={tail_tokens}."
            )

    def load(self, split: str) -> dict[str, np.ndarray]:
        arrays = self._read()
        if split not in self.meta["splits"]:
            raise InputError(f"unknown split {split!r}; this pack has {self.meta['splits']}.")
        lengths = arrays[f"{split}_length"]
        tokens = arrays[f"{split}_tokens"]
        if lengths.sum() != tokens.size or (lengths > self.meta["max_length"]).any():
            raise DataFormatError(
                f"{self.path}: the {split} lengths do not match its tokens; the pack is "
                "damaged: build it again with `hw2jax sentiment pack`."
            )
        ids = np.zeros((len(lengths), self.meta["max_length"]), np.int32)
        ids[np.arange(ids.shape[1])[None, :] < lengths[:, None]] = tokens
        return {"ids": ids, "length": lengths, "label": arrays[f"{split}_label"].astype(np.int32)}

    def load_all(self) -> dict[str, dict[str, np.ndarray]]:
        self._read()
        return {split: self.load(split) for split in self.meta["splits"]}


def _is_pack(path: Path) -> bool:
    return path.is_file() and path.name.endswith(".npz")


def _is_acl(path: Path) -> bool:
    return (path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar"))) or (
        (path / "aclImdb" / "train").is_dir() or (path / "train" / "pos").is_dir()
    )


def _missing_message(tried: list[str]) -> str:
    return (
        "IMDB reviews not found. Tried:\n  - " + "\n  - ".join(tried) + "\n"
        "Provide them in one of two ways:\n"
        f"  1. an aclImdb folder or aclImdb_v1.tar.gz, or a data root holding one of\n"
        f"     {', '.join(NAMES)}: --data-dir PATH or {ENV_VAR}=PATH;\n"
        f"     or a token pack ({PACK_NAME}, from `hw2jax sentiment pack`) the same way;\n"
        "  2. tensorflow-datasets 'imdb_reviews' (pip install 'hw2jax[tf]' when online)."
    )


def find_source(data_dir: str | os.PathLike | None = None, kind: str = "auto") -> DataSource:
    if kind not in ("auto", "local", "tfds"):
        raise InputError(f"unknown data source {kind!r}; choose auto, local or tfds.")
    if kind == "tfds":
        return TfdsSource("imdb_reviews", data_dir=data_dir or None, features=("text", "label"))
    chosen = data_dir or os.environ.get(ENV_VAR)
    if chosen:
        for pack in (Path(chosen), Path(chosen) / PACK_NAME):
            if _is_pack(pack):
                return TokenPackSource(pack)
        if _is_acl(Path(chosen)):
            return AclImdbSource(chosen)
        for name in NAMES:
            if (Path(chosen) / name).exists() and _is_acl(Path(chosen) / name):
                return AclImdbSource(Path(chosen) / name)
        raise DataNotFoundError(_missing_message([f"{chosen}: not an aclImdb folder or archive"]))
    tried = []
    for place in USUAL_PLACES:
        if place.exists() and _is_acl(place):
            return AclImdbSource(place)
        tried.append(f"{place}: not there")
    if kind == "auto" and tfds_available():
        return TfdsSource("imdb_reviews", features=("text", "label"), hint=_missing_message(tried))
    raise DataNotFoundError(_missing_message(tried))


# ------------------------------------------------------------------------------ tokens


def content_key(prefix: str, *arrays: np.ndarray) -> str:
    """A short hash of arrays' bytes, for naming cache files by their content."""
    h = hashlib.sha256(prefix.encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def tokenize(
    texts,
    tokenizer,
    max_length: int,
    cache_dir: str | os.PathLike | None = None,
    tail_tokens: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [N, max_length] (0-padded) and lengths [N], with [CLS] and [SEP]. A review
    longer than ``max_length`` keeps its last ``tail_tokens`` word pieces and as many of its
    first as fit before them (0: its start only). Keeping both ends ("head+tail") reads the
    conclusion of a long review, where its verdict often is (Sun et al. 2019, "How to Fine-Tune
    BERT for Text Classification?", found it best on IMDB). Batched through the fast tokenizer,
    and cached on disk by content."""
    if not 0 <= tail_tokens <= max_length - 2:
        raise InputError(
            f"tail_tokens={tail_tokens} must lie in 0..max_length - 2 = {max_length - 2} (room "
            "for [CLS] and [SEP]); lower it or raise max_length."
        )
    texts = [str(t) for t in texts]
    if cache_dir is not None:
        key = hashlib.sha256()
        key.update(f"{type(tokenizer).__name__}:{len(tokenizer)}:{max_length}".encode())
        if tail_tokens:  # so that files cached before the option keep their names
            key.update(f":tail {tail_tokens}".encode())
        key.update(str(sorted(tokenizer.get_vocab().items())[:50]).encode())
        for t in texts:
            key.update(t.encode("utf-8") + b"\0")
        path = Path(cache_dir) / f"tokens-{key.hexdigest()[:20]}.npz"
        if path.exists():
            with np.load(path) as f:
                return f["ids"], f["lengths"]
    ids = np.zeros((len(texts), max_length), np.int32)
    lengths = np.zeros(len(texts), np.int32)
    for start in range(0, len(texts), 2048):
        enc = tokenizer(
            texts[start : start + 2048],
            truncation=True,  # with tail_tokens, cut below (a length past any review's)
            max_length=max_length if not tail_tokens else 2**30,
            padding=False,
            return_attention_mask=False,
        )["input_ids"]
        for i, row in enumerate(enc, start):
            if len(row) > max_length:  # [CLS], the head, the tail, [SEP]
                head = max_length - 2 - tail_tokens
                row = [row[0], *row[1 : 1 + head], *row[len(row) - 1 - tail_tokens :]]
            ids[i, : len(row)] = row
            lengths[i] = len(row)
    if cache_dir is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=ids, lengths=lengths)
        os.replace(tmp, path)
    return ids, lengths


def bucket_batches(
    lengths: np.ndarray, batch_size: int, buckets: tuple[int, ...], rng: np.random.Generator | None
) -> list[tuple[np.ndarray, int]]:
    """Batches of similar length, like torchtext's BucketIterator: within pools of 50
    batches, sort by length and cut; each batch pads to the smallest bucket that fits, so
    jit sees at most len(buckets) shapes. ``rng=None`` keeps a fixed order (evaluation)."""
    n = len(lengths)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    pool = 50 * batch_size
    batches = []
    for start in range(0, n, pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        for b in range(0, len(chunk), batch_size):
            idx = chunk[b : b + batch_size]
            longest = int(lengths[idx].max())
            fit = [s for s in buckets if s >= longest]
            if not fit:
                raise InputError(
                    f"a review has {longest} tokens, more than the largest bucket "
                    f"{max(buckets)}; add a bucket or lower max_length."
                )
            batches.append((idx, fit[0]))
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
