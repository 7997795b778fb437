"""`hw2jax vit ablate`: the recipe and each variant trained in its own work dir, compared on
valid with test unread, the table checked against each run's own history, and bad variants
refused before anything trains."""

import json
from pathlib import Path

import pytest
from test_train_vit import SMALL_MODEL, small_config

from hw2jax import cli
from hw2jax.config import apply_overrides, load_config
from hw2jax.errors import InputError
from hw2jax.tasks import vit

ON_VALID = ("valid_size=30", "eval_split=valid", "best_metric=valid_accuracy", "read_test=False")
SHIPPED = Path(__file__).parents[1] / "experiments" / "vit_fashion_mnist_ablation.py"


def ablation_config(data, *overrides, **variants):
    config = small_config(data, "epochs=2", *ON_VALID, *overrides)
    config.ablation = variants
    return config


def test_each_variant_trains_apart_and_the_table_matches_their_histories(
    fashion_dir, tmp_path, capsys, monkeypatch
):
    config = ablation_config(fashion_dir, fast="learning_rate=1e-2 label_smoothing=0.1")
    rows = vit.ablate(config, tmp_path)
    assert [r["run"] for r in rows] == ["recipe", "fast"]
    settings = {"recipe": (3e-3, 0.0), "fast": (1e-2, 0.1)}
    for row in rows:
        run = tmp_path / row["run"]
        saved = json.loads((run / "config.json").read_text())
        assert (saved["learning_rate"], saved["label_smoothing"]) == settings[row["run"]]
        history = json.loads((run / "history.json").read_text())
        best = max(history["epochs"], key=lambda r: r["valid_accuracy"])
        assert (row["valid_accuracy"], row["epoch"]) == (best["valid_accuracy"], best["epoch"])
        recipe = rows[0]["valid_accuracy"]
        assert row["vs_recipe_points"] == pytest.approx(100 * (row["valid_accuracy"] - recipe))
        assert not (run / "results.json").exists()  # test unread
        assert not any("test_accuracy" in r for r in history["epochs"])
    assert "test set not read (read_test=False)" in capsys.readouterr().out
    fast = rows[1]
    assert (
        f"| fast | `learning_rate=1e-2 label_smoothing=0.1` | "
        f"{100 * fast['valid_accuracy']:.2f} % ({fast['epoch']} of 2) | "
        f"{fast['vs_recipe_points']:+.2f} |"
    ) in (tmp_path / "ablation.md").read_text()
    assert json.loads((tmp_path / "ablation.json").read_text())["runs"] == rows
    # Done runs are read back, not trained again.
    monkeypatch.setattr(vit, "train_and_evaluate", lambda *a: pytest.fail("trained again"))
    assert vit.ablate(config, tmp_path) == rows


@pytest.mark.parametrize(
    "variants, overrides, message",
    [
        ({"x": "augment_flpi=True"}, (), r"variant 'x' \(augment_flpi=True\): unknown config key"),
        ({"x": "label_smoothing=2.0"}, (), "label_smoothing: got 2.0; it must be below 1"),
        ({"x": "epochs"}, (), "override 'epochs' must look like key=value"),
        ({}, (), "this config has no ablation"),
        (
            {"x": "epochs=1"},
            ("eval_split=test", "best_metric=test_accuracy", "read_test=True"),
            "an ablation compares its runs on valid",
        ),
        ({"recipe": "epochs=1"}, (), "not 'recipe', the recipe's own run"),
        ({"a b": "epochs=1"}, (), r"ablation: got \{'a b'"),
        ({"x": ""}, (), r"ablation: got \{'x': ''\}; each entry maps a run name"),
        ({"x": 3}, (), r"ablation: got \{'x': 3\}; each entry maps a run name"),
    ],
)
def test_a_bad_ablation_is_refused_before_anything_trains(
    fashion_dir, tmp_path, variants, overrides, message
):
    config = ablation_config(fashion_dir, **variants)
    apply_overrides(config, overrides)
    with pytest.raises(InputError, match=message):
        vit.ablate(config, tmp_path / "ablation")
    assert not (tmp_path / "ablation").exists()


def test_read_test_false_needs_a_valid_split(fashion_dir):
    with pytest.raises(InputError, match="read_test=False keeps the test set unread"):
        vit.check(small_config(fashion_dir, "read_test=False"))


def test_the_shipped_ablation_undoes_one_change_per_run(fashion_dir, tmp_path, capsys):
    runs = dict(vit.ablation_runs(load_config(SHIPPED)))
    assert len(runs) == 8 and not runs["recipe"].read_test and runs["recipe"].epochs == 20
    assert (runs["constant_lr"].schedule, runs["recipe"].schedule) == ("constant", "warmup_cosine")
    assert (runs["no_erasing"].augment_erase, runs["recipe"].augment_erase) == (0.0, 0.25)
    # Its command, one variant kept, on the tiny data: the table is printed at the end.
    config = tmp_path / "one_variant.py"
    config.write_text(
        "import vit_fashion_mnist_ablation\n\n\ndef get_config():\n"
        "    c = vit_fashion_mnist_ablation.get_config()\n"
        "    c.ablation = {'no_erasing': c.ablation['no_erasing']}\n    return c\n"
    )
    args = ["vit", "ablate", "--config", str(config), "--workdir", str(tmp_path / "runs")]
    args += ["--data-dir", str(fashion_dir), "--epochs", "1"]
    for item in [*SMALL_MODEL, "valid_size=30", "batch_size=40", "eval_batch_size=16"]:
        args += ["--set", item]
    assert cli.main([*args, "--set", "progress=False"]) == 0
    out = capsys.readouterr().out
    assert "| recipe | none |" in out and "| no_erasing | `augment_erase=0.0` |" in out
