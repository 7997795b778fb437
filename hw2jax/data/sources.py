"""The one small interface every dataset sits behind: a source that loads a split as arrays."""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from hw2jax.errors import InputError, MissingFileError


class DataNotFoundError(MissingFileError):
    """No source could provide the dataset; the message lists every way to provide it."""


class DataFormatError(InputError):
    """A data file is damaged, truncated or not in the expected format; the message names the
    file and what to do."""


class DataSource(Protocol):
    """Loads one split of a dataset into memory as named NumPy arrays."""

    description: str

    def load(self, split: str) -> dict[str, np.ndarray]: ...


def tfds_available() -> bool:
    return importlib.util.find_spec("tensorflow_datasets") is not None


@contextlib.contextmanager
def _tempdir_of_our_own() -> Iterator[None]:
    """Points ``tempfile`` at a folder removed afterwards: tfds fetches a dataset's metadata
    into ``tempfile.mkdtemp("tfds")`` (``DatasetInfo.initialize_from_bucket``) and leaves the
    folder behind, one more in /tmp at each call."""
    with tempfile.TemporaryDirectory(prefix="hw2jax-tfds-") as folder:
        saved, tempfile.tempdir = tempfile.tempdir, folder
        try:
            yield
        finally:
            tempfile.tempdir = saved


def _first_line(error: Exception) -> str:
    """The error's first line, less a last sentence that only opens a list of the lines below
    ("... is not supported. Possible root causes:")."""
    line = str(error).splitlines()[0] if str(error) else ""
    if line.endswith(":") and ". " in line:
        return line[: line.rindex(". ") + 1]
    return line


class TfdsSource:
    """tensorflow-datasets, through ``tfds.data_source`` (array_record, no TensorFlow needed
    to read). Preparing the data (``download=True``) needs TensorFlow; ``manual_dir`` lets
    TFDS prepare offline from the original files."""

    def __init__(
        self,
        name: str,
        data_dir: str | None = None,
        download: bool = True,
        manual_dir: str | None = None,
        features: tuple[str, ...] = (),
        hint: str = "",
    ):
        self.name, self.data_dir, self.download = name, data_dir, download
        self.manual_dir, self.features, self.hint = manual_dir, features, hint
        self.description = f"tensorflow-datasets {name!r}" + (f" in {data_dir}" if data_dir else "")

    def _kwargs(self) -> dict[str, Any]:
        import tensorflow_datasets as tfds

        kwargs: dict[str, Any] = {"data_dir": self.data_dir, "download": self.download}
        if self.manual_dir:
            config = tfds.download.DownloadConfig(manual_dir=self.manual_dir)
            kwargs["download_and_prepare_kwargs"] = {"download_config": config}
        return kwargs

    def load(self, split: str) -> dict[str, np.ndarray]:
        import tensorflow_datasets as tfds

        try:
            with _tempdir_of_our_own():
                source = tfds.data_source(self.name, split=split, **self._kwargs())
        except Exception as e:  # offline download, missing TensorFlow, ...: one clear error
            raise DataNotFoundError(
                f"tensorflow-datasets could not provide {self.name!r} ({type(e).__name__}: "
                f"{_first_line(e)[:200]}).\n{self.hint}"
            ) from e
        records = [source[i] for i in range(len(source))]
        keys = self.features or tuple(records[0])
        return {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}
