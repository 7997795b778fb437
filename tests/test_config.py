"""One config schema: every experiment checked before any work, one message per mistake."""

import sys
from pathlib import Path

import pytest

from hw2jax import cli
from hw2jax.config import (
    ConfigError,
    apply_overrides,
    batch_split_problem,
    check_config,
    load_config,
    set_values,
)
from hw2jax.errors import InputError
from hw2jax.tasks import sentiment, vit

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
VIT = EXPERIMENTS / "vit_fashion_mnist.py"


@pytest.mark.parametrize(
    "name,schema",
    [
        ("vit_fashion_mnist", vit.SCHEMA),
        ("vit_fashion_mnist_strong", vit.SCHEMA),
        ("bert_gru_imdb", sentiment.SCHEMA),
        ("bert_gru_imdb_tuned", sentiment.SCHEMA),
    ],
)
def test_every_experiment_fits_its_schema_and_shares_the_loop_base(name, schema):
    config = load_config(EXPERIMENTS / f"{name}.py")
    check_config(config.to_dict(), schema)
    base = load_config(EXPERIMENTS / "common.py")
    assert set(base.keys()) <= set(config.keys())  # the loop keys come from one place
    assert "common" not in sys.modules  # the config's own import does not leak


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "optimiser=adamw",
            "unknown config key 'optimiser'; the keys are: ablation, augment_erase, augment_flip,",
        ),
        ("model.depht=2", "unknown config key 'model.depht'; the keys in model are: attention,"),
        (
            "modle.depth=2",
            "unknown config key 'modle.depth'; the keys are: ablation, augment_erase,",
        ),
        (
            "optimizer.learning_rate=1e-3",
            "optimizer is a single value (str 'adam_l2'), not a group of settings. Set it "
            "directly, e.g. optimizer=VALUE; the groups are: ablation, model.",
        ),
        ("model=3", "model is a group of settings (attention, channels, depth,"),
        ("epochs=three", "epochs='three': expected int (as its value 15 is), got str."),
        ("epochs=true", "epochs='true': expected int (as its value 15 is), got bool."),
        ("learning_rate=True", "learning_rate='True': expected float (as its value 0.0"),
        ("learning_rate", "override 'learning_rate' must look like key=value"),
    ],
)
def test_override_mistakes_name_the_valid_keys(override, message):
    config = load_config(VIT)
    with pytest.raises(ConfigError) as e:
        apply_overrides(config, [override])
    assert message in str(e.value)


def test_a_wrong_type_names_the_value_an_earlier_override_set():
    config = load_config(VIT)
    with pytest.raises(ConfigError) as e:
        apply_overrides(config, ["epochs=3", "epochs=three"])
    assert "epochs='three': expected int (as its value 3 is), got str." in str(e.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("epochs=0", "epochs: got 0; it must be >= 1"),
        ("epochs=-1", "epochs: got -1; it must be >= 1"),
        ("batch_size=0", "batch_size: got 0; it must be >= 1"),
        ("batch_size=-5", "batch_size: got -5; it must be >= 1"),
        ("learning_rate=0", "learning_rate: got 0.0; it must be > 0.0"),
        ("optimizer=sgd", "optimizer: got 'sgd'; choose one of 'adam_l2', 'adamw'"),
        (
            "model.attention=flash",
            "model.attention: got 'flash'; choose one of 'softmax', 'linear'",
        ),
        ("model.merged_attention=yes", "model.merged_attention: expected None or bool, got str"),
        ("devices=none", "devices: got 'none'; 'all' or a positive count"),
        ("best_metric=test_loss", "best_metric 'test_loss' is not recorded;"),
        ("valid_size=60000", "valid_size: got 60000; it must leave images to train on"),
        ("augment_erase=1.5", "augment_erase: got 1.5; it is a probability (<= 1)"),
        ("label_smoothing=1.0", "label_smoothing: got 1.0; it must be below 1"),
    ],
)
def test_out_of_range_values_are_refused_before_any_work(tmp_path, override, message):
    config = load_config(VIT)
    # No data there: a check that let the value through fails at once rather than training.
    apply_overrides(config, [f"data_dir={tmp_path / 'no_data'}", override])
    with pytest.raises(ConfigError) as e:
        vit.train_and_evaluate(config, tmp_path / "run")
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before the work dir, data or compiling


def test_a_float_key_takes_an_int_and_refuses_a_bool_or_text():
    """A config file may write learning_rate = 1: an int where a float is expected is widened,
    and the smallest counts in range are taken; a bool or a string is no number to train with,
    also when the Python API sets it."""
    config = load_config(VIT).to_dict()
    check_config(
        {**config, "learning_rate": 1, "eval_batch_size": 1, "log_every_steps": 1}, vit.SCHEMA
    )
    for value, got in ((True, "bool True"), ("fast", "str 'fast'")):
        with pytest.raises(ConfigError, match=f"learning_rate: expected float, got {got}"):
            check_config({**config, "learning_rate": value}, vit.SCHEMA)
    with pytest.raises(ConfigError, match="learning_rate='True': expected float"):
        set_values(load_config(VIT), {"learning_rate": True})


def test_a_batch_that_does_not_split_over_the_devices_is_named():
    assert batch_split_problem(2, (4, 8)) is None
    assert batch_split_problem(3, (0, 6)) is None  # no batch of that kind
    for sizes, named in (((1, 4), "batch size 1 "), ((4, 3), "batch size 3 ")):
        problem = batch_split_problem(2, sizes)
        assert problem is not None and problem.startswith(f"{named}does not split evenly over 2")


def test_a_config_file_with_a_stray_or_missing_key_is_refused(tmp_path):
    config = load_config(VIT)
    config.learning_rte = 1e-3
    del config["seed"]
    with pytest.raises(ConfigError) as e:
        vit.check(config)
    keys = "unknown key learning_rte; the keys are: ablation, augment_erase, augment_flip"
    assert keys in str(e.value)
    assert "missing key seed" in str(e.value)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--epochs", "0"], "epochs: got 0; it must be >= 1"),
        (["--epochs", "-1"], "epochs: got -1; it must be >= 1"),
        (["--set", "batch_size=0"], "batch_size: got 0; it must be >= 1"),
        (["--set", "optimizer.learning_rate=1e-3"], "optimizer is a single value"),
    ],
)
def test_cli_gives_one_line_and_no_workdir(tmp_path, capsys, args, message):
    no_data = ["--data-dir", str(tmp_path / "no_data")]  # a check that let it through fails fast
    code = cli.main(
        ["vit", "train", "--config", str(VIT), "--workdir", str(tmp_path / "w"), *no_data, *args]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_sentiment_schema_refuses_before_loading_an_encoder(tmp_path):
    config = load_config(EXPERIMENTS / "bert_gru_imdb.py")
    apply_overrides(config, ["encoder_dtype=float16", "max_length=1024"])
    with pytest.raises(ConfigError) as e:
        sentiment.train_and_evaluate(config, tmp_path / "run")
    assert "encoder_dtype: got 'float16'; choose one of 'auto', 'float32', 'bfloat16'" in str(
        e.value
    )
    assert "max_length: got 1024; 2 <= max_length <= 512" in str(e.value)
    assert not (tmp_path / "run").exists()
    for length, fits in ((1, False), (2, True), (512, True), (513, False)):
        apply_overrides(config, ["encoder_dtype=float32", f"max_length={length}"])
        if fits:
            sentiment.check(config)
        else:
            with pytest.raises(ConfigError, match=f"max_length: got {length}; 2 <= max_length"):
                sentiment.check(config)
    # The tail kept from a long review leaves room for [CLS] and [SEP].
    apply_overrides(config, ["max_length=64", "tail_tokens=62"])
    sentiment.check(config)
    apply_overrides(config, ["tail_tokens=63"])
    with pytest.raises(InputError, match=r"tail_tokens=63 leaves no room in max_length=64 .*62"):
        sentiment.check(config)


BAD_CONFIGS = {
    "syntax.py": (
        "import ml_collections\ndef get_config(:\n    pass\n",
        "syntax.py, line 2: invalid syntax; fix the syntax there.",
    ),
    "raises.py": (
        "import ml_collections\n\ndef get_config():\n    return {}['missing']\n",
        "raises.py, line 4: KeyError: 'missing'; fix the file there.",
    ),
    "no_function.py": ("CONFIG = 1\n", "has no get_config() function; define one that returns"),
    "returns_a_dict.py": (
        "def get_config():\n    return {'epochs': 1}\n",
        "returned a dict, not an ml_collections.ConfigDict; return one",
    ),
    "imports_a_missing_module.py": (
        "import my_common\n\ndef get_config():\n    return my_common.get_config()\n",
        "line 1: ModuleNotFoundError: No module named 'my_common'; put my_common.py beside",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_a_config_file_that_cannot_run_is_one_line_naming_file_and_line(tmp_path, capsys, name):
    text, message = BAD_CONFIGS[name]
    path = tmp_path / name
    path.write_text(text)
    code = cli.main(["vit", "train", "--config", str(path), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"hw2jax: error: config file {path}") or "get_config() in" in err
    assert message in err
    assert not (tmp_path / "w").exists()


def test_a_config_copied_to_another_folder_still_finds_common(tmp_path):
    """A copy of an experiment config outside the checkout imports the shipped common.py and
    the config it builds on; one beside it wins over the shipped one."""
    for name in ("vit_fashion_mnist_long.py", "bert_gru_imdb_finetune.py"):
        (tmp_path / name).write_text((EXPERIMENTS / name).read_text())
        assert load_config(tmp_path / name) == load_config(EXPERIMENTS / name)
    (tmp_path / "common.py").write_text(
        (EXPERIMENTS / "common.py")
        .read_text()
        .replace("log_every_steps = 100", "log_every_steps = 7")
    )
    assert load_config(tmp_path / "vit_fashion_mnist_long.py").log_every_steps == 7
    assert "common" not in sys.modules  # found only while the file ran
