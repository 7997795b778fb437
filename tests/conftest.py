import numpy as np
import pytest

from hw2jax.data import write_idx


def make_fashion_folder(folder, n_train=96, n_test=40, gz=True, seed=0):
    """Writes a tiny FashionMNIST-format folder whose classes are learnable: each class
    lights up its own horizontal band of the image."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label : 4 + 2 * label, 4:24] = 250
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return folder


@pytest.fixture
def fashion_dir(tmp_path):
    return make_fashion_folder(tmp_path / "fashion")
