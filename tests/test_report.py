"""`hw2jax report`: a run's per-epoch table and several runs' accuracies side by side."""

import json

import pytest

from hw2jax import cli
from hw2jax.train.report import comparison_table, epoch_table


def _history(accuracies, split="test", status="done"):
    return {
        "status": status,
        "epochs": [
            {
                "epoch": i + 1,
                "train_loss": 1.0 / (i + 1),
                f"{split}_loss": 0.5,
                f"{split}_accuracy": acc,
                "train_time_s": 1234.4,
                "images_per_s": 98.6,
            }
            for i, acc in enumerate(accuracies)
        ],
    }


def _run(tmp_path, name, history):
    (tmp_path / name).mkdir()
    (tmp_path / name / "history.json").write_text(json.dumps(history))
    return tmp_path / name


def test_epoch_table_rows():
    table = epoch_table(_history([0.5, 0.8125]), "images")
    assert table.splitlines()[0].startswith("| epoch | train loss | test loss | test accuracy |")
    assert table.splitlines()[-1] == "| 2 | 0.5000 | 0.5000 | 81.25 % | 1,234 | 99 |"
    assert epoch_table({"epochs": []}) == "(no finished epoch)"


def test_runs_side_by_side_leave_unreached_epochs_empty(tmp_path, capsys):
    a = _run(tmp_path, "performer", _history([0.8426, 0.8516], status="running"))
    b = _run(tmp_path, "softmax", _history([0.8334, 0.8551, 0.853]))
    assert cli.main(["report", str(a), "--against", str(b)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "status: running"
    assert lines[-4] == "| test accuracy (%) | 1 | 2 | 3 |"
    assert lines[-2] == "| performer | 84.26 | 85.16 |  |"
    assert lines[-1] == "| softmax | 83.34 | 85.51 | 85.30 |"
    # The same folder name twice: the second is named by its path.
    table = comparison_table({"x": _history([0.5]), "y": _history([0.25])})
    assert table.splitlines()[-1] == "| y | 25.00 |"


def test_runs_on_other_splits_or_missing_are_refused(tmp_path, capsys):
    a = _run(tmp_path, "vit", _history([0.9]))
    b = _run(tmp_path, "imdb", _history([0.8], split="valid"))
    with pytest.raises(ValueError, match="different splits"):
        comparison_table({"vit": _history([0.9]), "imdb": _history([0.8], split="valid")})
    assert cli.main(["report", str(a), "--against", str(b)]) == 2
    assert "different splits (vit: test, imdb: valid)" in capsys.readouterr().err
    assert cli.main(["report", str(a), "--against", str(tmp_path / "nowhere")]) == 2
    assert "nowhere not found; give a work dir" in capsys.readouterr().err
