"""FashionMNIST from a local idx folder or tensorflow-datasets, fully in memory."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from hw2jax.data.idx import IdxFormatError, read_idx
from hw2jax.data.sources import DataNotFoundError, DataSource, TfdsSource, tfds_available
from hw2jax.errors import InputError

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# The assignment normalised with MNIST's statistics; kept for faithfulness.
MEAN, STD = 0.1307, 0.3081
ENV_VAR = "HW2JAX_DATA_DIR"

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Debian's dataset-fashion-mnist and our cache.
USUAL_PLACES = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path.home() / ".cache" / "hw2jax" / "fashion-mnist",
)
# Inside a data root ($HW2JAX_DATA_DIR holding several datasets), FashionMNIST's folder.
SUBFOLDER = "fashion-mnist"


@dataclasses.dataclass(frozen=True)
class ImageSplit:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.labels)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def idx_folder_complete(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return all(_find_file(folder, stem) for pair in _FILES.values() for stem in pair)


class IdxFolderSource:
    """The four original idx files (gzipped or not) in one folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.description = f"idx files in {self.folder}"

    def load(self, split: str) -> dict[str, np.ndarray]:
        if split not in _FILES:
            raise InputError(f"unknown split {split!r}; FashionMNIST has {sorted(_FILES)}.")
        paths = [_find_file(self.folder, stem) for stem in _FILES[split]]
        missing = [stem for stem, p in zip(_FILES[split], paths, strict=True) if p is None]
        if missing:
            raise DataNotFoundError(
                f"{self.folder} lacks {', '.join(m + '[.gz]' for m in missing)} "
                f"for split {split!r}."
            )
        images = read_idx(paths[0], (None, 28, 28))
        labels = read_idx(paths[1], (None,))
        if len(labels) != len(images):
            raise IdxFormatError(
                f"{paths[1]} has {len(labels)} labels but {paths[0]} has {len(images)} images; "
                "the two files of a split must come from the same release."
            )
        if labels.max(initial=0) > 9:
            raise InputError(f"{paths[1]}: labels must be 0..9, found {labels.max()}.")
        return {"image": images[..., None], "label": labels}


def _missing_data_message(tried: list[str]) -> str:
    return (
        "FashionMNIST not found. Tried:\n  - " + "\n  - ".join(tried) + "\n"
        "Provide it in one of three ways:\n"
        f"  1. a folder with the four idx files (train-images-idx3-ubyte[.gz], ...), or a\n"
        f"     data root with them in {SUBFOLDER}/: pass --data-dir FOLDER or set\n"
        f"     {ENV_VAR}=FOLDER (on Debian:\n"
        "     `apt-get install dataset-fashion-mnist` puts them in\n"
        "     /usr/share/datasets/fashion-mnist);\n"
        "  2. tensorflow-datasets prepared offline from those files:\n"
        "     pip install 'hw2jax[tfds]' and pass --data-source tfds --data-dir FOLDER;\n"
        "  3. tensorflow-datasets downloading it, when online: pip install 'hw2jax[tfds]'."
    )


def find_source(data_dir: str | os.PathLike | None = None, kind: str = "auto") -> DataSource:
    """Picks where FashionMNIST comes from.

    ``kind="auto"``: the idx files in ``data_dir`` (or ``$HW2JAX_DATA_DIR``); without either,
    the usual places, then tensorflow-datasets. ``kind="idx"`` or ``"tfds"`` forces one.
    """
    if kind not in ("auto", "idx", "tfds"):
        raise InputError(f"unknown data source {kind!r}; choose auto, idx or tfds.")
    chosen = data_dir or os.environ.get(ENV_VAR)
    tried: list[str] = []
    if kind == "tfds":
        if not tfds_available():
            raise DataNotFoundError(_missing_data_message(["tensorflow-datasets: not installed"]))
        # A folder of raw files is a manual_dir for TFDS to prepare from.
        manual = str(chosen) if chosen and idx_folder_complete(chosen) else None
        return TfdsSource("fashion_mnist", data_dir=None if manual else chosen, manual_dir=manual)
    if chosen:
        if idx_folder_complete(chosen):
            return IdxFolderSource(chosen)
        if idx_folder_complete(Path(chosen) / SUBFOLDER):
            return IdxFolderSource(Path(chosen) / SUBFOLDER)
        if kind == "idx" or not Path(chosen).is_dir():
            raise DataNotFoundError(
                _missing_data_message([f"{chosen}: not a folder with all four idx files"])
            )
        tried.append(f"{chosen}: no idx files")
        if tfds_available():
            hint = _missing_data_message([*tried, f"{chosen}: tensorflow-datasets' store"])
            return TfdsSource("fashion_mnist", data_dir=str(chosen), download=False, hint=hint)
        raise DataNotFoundError(_missing_data_message(tried))
    for place in USUAL_PLACES:
        if idx_folder_complete(place):
            return IdxFolderSource(place)
        tried.append(f"{place}: no idx files")
    if kind == "auto" and tfds_available():
        return TfdsSource("fashion_mnist", hint=_missing_data_message(tried))
    tried.append("tensorflow-datasets: not installed")
    raise DataNotFoundError(_missing_data_message(tried))


def load(source: DataSource, split: str) -> ImageSplit:
    arrays = source.load(split)
    images = np.asarray(arrays["image"], np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    return ImageSplit(images, np.asarray(arrays["label"], np.int32))


def normalize(images):
    """uint8 -> float, (x / 255 - 0.1307) / 0.3081, as the assignment's transforms did."""
    return (images / 255.0 - MEAN) / STD
