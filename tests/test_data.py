import gzip

import numpy as np
import pytest
from conftest import make_fashion_folder

from hw2jax.data import DataNotFoundError, IdxFormatError, fashion_mnist, read_idx, write_idx
from hw2jax.data.sources import TfdsSource
from hw2jax.errors import InputError


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
    array = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / name, array)
    raw = (tmp_path / name).read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    np.testing.assert_array_equal(read_idx(tmp_path / name, (None, 28, 28)), array)


def test_idx_header_is_the_real_format(tmp_path):
    # Independent check of the layout: magic 0x00000803, then big-endian dims, then bytes.
    write_idx(tmp_path / "x", np.arange(6, dtype=np.uint8).reshape(1, 2, 3))
    header = bytes.fromhex("00000803 00000001 00000002 00000003")
    assert (tmp_path / "x").read_bytes() == header + bytes(range(6))


def test_idx_errors_name_the_problem(tmp_path):
    good = np.zeros((4, 28, 28), np.uint8)
    write_idx(tmp_path / "good", good)
    data = (tmp_path / "good").read_bytes()

    for i, byte in ((0, 1), (1, 1), (2, 0x0D), (3, 0), (3, 5)):  # each byte of the magic alone
        magic = bytearray(data[:4])
        magic[i] = byte
        (tmp_path / "magic").write_bytes(bytes(magic) + data[4:])
        with pytest.raises(IdxFormatError, match=f"bad magic number {magic.hex()}"):
            read_idx(tmp_path / "magic")
    # Dimensions are 4-byte big-endian: one of 2^24 + 1 is read whole, not from its low bytes.
    (tmp_path / "huge").write_bytes(bytes.fromhex("00000802 00000001 01000001") + bytes(10))
    with pytest.raises(IdxFormatError, match=r"shape \(1, 16777217\) \(16777229 bytes\)"):
        read_idx(tmp_path / "huge")
    write_idx(tmp_path / "empty", np.zeros((0, 28, 28), np.uint8))  # only a header: no images
    assert read_idx(tmp_path / "empty", (None, 28, 28)).shape == (0, 28, 28)
    (tmp_path / "short").write_bytes(data[:-10])
    with pytest.raises(IdxFormatError, match="truncated"):
        read_idx(tmp_path / "short")
    with pytest.raises(IdxFormatError, match=r"expected \(\*, 32, 32\)"):
        read_idx(tmp_path / "good", (None, 32, 32))
    (tmp_path / "badgz.gz").write_bytes(gzip.compress(data)[:30])
    with pytest.raises(IdxFormatError, match="gzip"):
        read_idx(tmp_path / "badgz.gz")


@pytest.mark.parametrize("gz", [True, False])
def test_local_folder_loads_both_splits(tmp_path, gz):
    folder = make_fashion_folder(tmp_path / "f", n_train=30, n_test=12, gz=gz)
    source = fashion_mnist.find_source(folder)
    train, test = fashion_mnist.load(source, "train"), fashion_mnist.load(source, "test")
    assert train.images.shape == (30, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.labels.shape == (12,) and test.labels.dtype == np.int32
    expected = read_idx(folder / f"t10k-labels-idx1-ubyte{'.gz' if gz else ''}")
    np.testing.assert_array_equal(test.labels, expected)


def test_label_count_must_match_images(tmp_path):
    folder = make_fashion_folder(tmp_path / "f", n_train=30, n_test=12)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(IdxFormatError, match=r"11 labels but .* 12 images"):
        fashion_mnist.load(fashion_mnist.IdxFolderSource(folder), "test")


def test_labels_past_nine_are_refused(tmp_path):
    folder = make_fashion_folder(tmp_path / "f", n_train=30, n_test=12)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([3] * 11 + [10], np.uint8))
    with pytest.raises(InputError, match=r"labels must be 0\.\.9, found 10"):
        fashion_mnist.load(fashion_mnist.IdxFolderSource(folder), "test")


def test_a_named_folder_without_idx_files(tmp_path, monkeypatch):
    """A named path that is not a folder is refused whatever the source; a folder without the
    files is refused when idx files were asked for, else read as TFDS's own data dir, offline."""
    monkeypatch.setattr(fashion_mnist, "tfds_available", lambda: True)
    for kind in ("auto", "idx"):
        with pytest.raises(DataNotFoundError, match="not a folder with all four"):
            fashion_mnist.find_source(tmp_path / "typo", kind=kind)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="not a folder with all four"):
        fashion_mnist.find_source(tmp_path / "empty", kind="idx")
    source = fashion_mnist.find_source(tmp_path / "empty")
    assert isinstance(source, TfdsSource) and source.data_dir == str(tmp_path / "empty")
    assert source.download is False


def test_env_var_and_argument_pick_the_folder(tmp_path, monkeypatch):
    a = make_fashion_folder(tmp_path / "a", n_train=10, n_test=5)
    b = make_fashion_folder(tmp_path / "b", n_train=20, n_test=5)
    monkeypatch.setenv("HW2JAX_DATA_DIR", str(a))
    assert len(fashion_mnist.load(fashion_mnist.find_source(), "train")) == 10
    assert len(fashion_mnist.load(fashion_mnist.find_source(b), "train")) == 20


def test_nothing_found_lists_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.delenv("HW2JAX_DATA_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "USUAL_PLACES", (tmp_path / "nowhere",))
    monkeypatch.setattr(fashion_mnist, "tfds_available", lambda: False)
    with pytest.raises(DataNotFoundError) as exc:
        fashion_mnist.find_source()
    message = str(exc.value)
    for hint in (
        "--data-dir",
        "HW2JAX_DATA_DIR",
        "dataset-fashion-mnist",
        "hw2jax[tfds]",
        "when online",
        str(tmp_path / "nowhere"),
    ):
        assert hint in message
    with pytest.raises(DataNotFoundError, match="not a folder with all four"):
        fashion_mnist.find_source(tmp_path / "empty", kind="idx")


def test_tfds_source_reads_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        source = fashion_mnist.find_source(kind="tfds")
        train = fashion_mnist.load(source, "train")
    assert train.images.shape == (24, 28, 28, 1) and train.images.dtype == np.uint8
    assert train.labels.shape == (24,) and set(np.unique(train.labels)) <= set(range(10))


def test_normalize_matches_the_assignment():
    x = np.array([0, 255], np.uint8)
    np.testing.assert_allclose(fashion_mnist.normalize(x), [-0.1307 / 0.3081, 0.8693 / 0.3081])


def test_tfds_fallback_failure_is_one_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.delenv("HW2JAX_DATA_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "USUAL_PLACES", (tmp_path / "nowhere",))
    source = fashion_mnist.find_source()
    assert "tensorflow-datasets" in source.description
    assert source.download is True  # the real download path, for a machine that is online
    source.data_dir = str(tmp_path / "tfds")  # nothing prepared there, and no download
    source.download = False
    with pytest.raises(DataNotFoundError) as exc:
        fashion_mnist.load(source, "train")
    assert "could not provide 'fashion_mnist'" in str(exc.value)
    assert "dataset-fashion-mnist" in str(exc.value)  # the three ways, again
    # A data dir without the idx files is read as tensorflow-datasets' store, offline: where
    # that fails too, the message names both places and the three ways.
    (tmp_path / "other").mkdir()
    with pytest.raises(DataNotFoundError) as exc:
        fashion_mnist.load(fashion_mnist.find_source(tmp_path / "other"), "train")
    message = str(exc.value)
    assert "could not provide 'fashion_mnist'" in message and "dataset-fashion-mnist" in message
    assert f"{tmp_path / 'other'}: no idx files" in message
    assert ":)" not in message  # the cause's first line, not a list's opening cut from the list


def test_a_tfds_load_leaves_no_folder_in_the_temp_dir(tmp_path, monkeypatch):
    """tfds fetches a dataset's metadata into tempfile.mkdtemp("tfds") and never removes the
    folder: a load (here one that fails, as offline) leaves the temp dir as it found it."""
    import tempfile

    pytest.importorskip("tensorflow_datasets")
    from hw2jax.data.sources import TfdsSource

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    source = TfdsSource("fashion_mnist", data_dir=str(tmp_path / "tfds"), download=False)
    with pytest.raises(DataNotFoundError, match="could not provide 'fashion_mnist'"):
        source.load("train")
    assert list(scratch.iterdir()) == []
    assert tempfile.tempdir == str(scratch)


def test_a_data_root_holds_each_dataset_in_its_usual_name(tmp_path, monkeypatch):
    """$HW2JAX_DATA_DIR may name a folder of datasets, as the Makefile does with the project's
    shared data: FashionMNIST in fashion-mnist/, IMDB as aclImdb_labeled.tar.gz (or aclImdb/)."""
    import tarfile
    from pathlib import Path

    from hw2jax.data import imdb

    make_fashion_folder(tmp_path / "fashion-mnist", n_train=12, n_test=5)
    with tarfile.open(tmp_path / "aclImdb_labeled.tar.gz", "w:gz") as tar:
        tar.add(Path(__file__).parent / "fixtures" / "aclImdb", arcname="aclImdb")
    monkeypatch.setenv("HW2JAX_DATA_DIR", str(tmp_path))
    assert len(fashion_mnist.load(fashion_mnist.find_source(), "train")) == 12
    source = imdb.find_source()
    assert source.path == tmp_path / "aclImdb_labeled.tar.gz"
    assert len(source.load("test")["label"]) == 12
    # The package itself names no path of this checkout.
    import hw2jax

    package = Path(hw2jax.__file__).parent
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert "shared/data" not in text and "parents[2]" not in text, path


def test_a_token_pack_holds_ids_0_to_65535_and_refuses_others(tmp_path):
    """Word pieces are packed as uint16 up to each review's length; padding past it is not
    packed, whatever it holds, and an id outside 0..65535 is refused before anything is
    written."""
    from hw2jax.data import imdb

    def pack(name, ids, lengths):
        split = {"ids": np.array(ids), "length": np.array(lengths), "label": np.array([0, 1])}
        return imdb.save_token_pack(
            tmp_path / name, {"train": split}, max_length=3, vocab_digest="x"
        )

    with np.load(pack("p.npz", [[101, 0, 65535], [101, 70000, -5]], [3, 1])) as f:
        assert f["train_tokens"].tolist() == [101, 0, 65535, 101]
    for bad in (65536, -1):
        with pytest.raises(InputError, match=r"token ids must lie in 0\.\.65535"):
            pack("q.npz", [[101, bad, 2], [101, 2, 3]], [3, 3])
    assert not (tmp_path / "q.npz").exists()


def test_imdb_with_no_folder_named_tries_the_usual_places_then_tfds_under_auto_only(
    tmp_path, monkeypatch
):
    import shutil
    from pathlib import Path

    from hw2jax.data import imdb

    monkeypatch.delenv("HW2JAX_DATA_DIR", raising=False)
    monkeypatch.setattr(imdb, "USUAL_PLACES", (tmp_path / "aclImdb",))
    monkeypatch.setattr(imdb, "tfds_available", lambda: True)
    assert isinstance(imdb.find_source(kind="auto"), TfdsSource)
    with pytest.raises(DataNotFoundError, match=r"aclImdb: not there"):
        imdb.find_source(kind="local")
    shutil.copytree(Path(__file__).parent / "fixtures" / "aclImdb", tmp_path / "aclImdb")
    for kind in ("auto", "local"):
        assert imdb.find_source(kind=kind).path == tmp_path / "aclImdb"


def test_a_tfds_failure_names_its_cause_by_its_first_sentences(monkeypatch):
    """The cause's first line, less a last sentence that only opens a list of the lines below
    it; a first line that opens nothing, or is one sentence, is kept whole."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from hw2jax.data.sources import TfdsSource

    for raised, shown in (
        (
            "Format X is not supported. Possible root causes:\n\t* one\n\t* two",
            "(NotImplementedError: Format X is not supported.)",
        ),
        ("Not found. Try again later.\nmore", "(NotImplementedError: Not found. Try again later.)"),
        ("Missing these files:\n a\n b", "(NotImplementedError: Missing these files:)"),
        ("", "(NotImplementedError: )"),
    ):

        def fail(*args, raised=raised, **kwargs):
            raise NotImplementedError(raised)

        monkeypatch.setattr(tfds, "data_source", fail)
        with pytest.raises(DataNotFoundError) as exc:
            TfdsSource("fashion_mnist", hint="the hint").load("train")
        assert (
            str(exc.value)
            == f"tensorflow-datasets could not provide 'fashion_mnist' {shown}.\nthe hint"
        )
