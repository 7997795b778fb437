"""`hw2jax report`: a run's per-epoch table and several runs' accuracies side by side."""

import json

import pytest

from hw2jax import cli
from hw2jax.train import run_files
from hw2jax.train.report import comparison_table, epoch_table, report, timing


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
    table = epoch_table(_history([0.5, 0.8125]))
    assert table.splitlines()[0].startswith("| epoch | train loss | test loss | test accuracy |")
    assert table.splitlines()[-1] == "| 2 | 0.5000 | 0.5000 | 81.25 % | 1,234 | 99 |"
    assert epoch_table({"epochs": []}) == "(no finished epoch)"


def test_an_epoch_resumed_midway_says_its_time_covers_only_the_steps_after_the_resume():
    history = _history([0.5, 0.8125])
    history["epochs"][1].update(step=1094, timed_from_step=1090, images_per_s=0.21)
    lines = epoch_table(history).splitlines()
    assert lines[-3] == "| 2 | 0.5000 | 0.5000 | 81.25 % | 1,234* | 0.2* |"
    assert lines[-1] == (
        "\\* timed over the steps after a resume within the epoch only "
        "(from step 1,090 in epoch 2)."
    )
    assert "*" not in lines[2]  # the first epoch ran whole in one process
    assert timing(history["epochs"][1], "images") == (
        "1,234 s, 0.2 images/s over the 4 steps after the resume at step 1,090"
    )


def test_runs_side_by_side_leave_unreached_epochs_empty(tmp_path, capsys):
    a = _run(tmp_path, "performer", _history([0.8426, 0.8516], status="interrupted"))
    b = _run(tmp_path, "softmax", _history([0.8334, 0.8551, 0.853]))
    assert cli.main(["report", str(a), "--against", str(b)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "status: interrupted"
    assert lines[-6] == "| test accuracy (%) | 1 | 2 | 3 |"
    assert lines[-4] == "| performer | 84.26 | 85.16 |  |"
    assert lines[-3] == "| softmax | 83.34 | 85.51 | 85.30 |"
    assert lines[-1] == f"curves of the 2 runs drawn in {a / 'compared.png'}"
    assert (a / "compared.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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


def test_compared_curves_plot_each_run_by_name(tmp_path, monkeypatch):
    from hw2jax.train import plots

    drawn = {}

    def keep(fig, path):
        ax_loss, ax_acc = fig.axes
        drawn["acc"] = {line.get_label(): list(line.get_ydata()) for line in ax_acc.get_lines()}
        drawn["loss"] = {line.get_label(): list(line.get_xdata()) for line in ax_loss.get_lines()}
        drawn["path"] = path

    monkeypatch.setattr(plots, "save_figure", keep)
    a, b = _history([0.5, 0.75]), _history([0.25])
    a["train"] = [{"step": 3, "loss": 2.0}, {"step": 6, "loss": 1.0}]
    b["train"] = [{"step": 3, "loss": 2.5}]
    report(_run(tmp_path, "a", a), (_run(tmp_path, "b", b),), tmp_path / "both.png")
    assert drawn["acc"] == {"a": [50.0, 75.0], "b": [25.0]}
    assert drawn["loss"] == {"a": [3, 6], "b": [3]}
    assert drawn["path"] == tmp_path / "both.png"


def test_a_damaged_history_is_one_line_naming_the_file(tmp_path, capsys):
    run = _run(tmp_path, "cut", _history([0.5]))
    (run / "history.json").write_text('{"status": "run')  # cut short mid-write
    assert cli.main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hw2jax: error: {run / 'history.json'} is damaged (JSONDecodeError")
    assert len(err.splitlines()) == 1


def test_an_unexpected_error_keeps_its_traceback(tmp_path, monkeypatch):
    from hw2jax.train import report as report_module

    def broken(*args, **kwargs):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(report_module, "epoch_table", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["report", str(_run(tmp_path, "ok", _history([0.5])))])


def test_the_unit_comes_from_the_history_or_its_config():
    from hw2jax.train.report import unit

    assert unit({"unit": "sequences", "config": {"encoder": "minilm"}}) == "sequences"
    assert unit({"config": {"encoder": "minilm", "eval_split": "valid"}}) == "reviews"
    assert unit({"config": {"seq_len": 64}}) == "sequences"
    assert unit({"config": {"model": {"attention": "softmax"}, "eval_split": "valid"}}) == "images"


def test_a_running_status_with_no_process_says_it_stopped(tmp_path):
    """history.json says running after kill -9 (nothing could write); the report asks the
    work dir's lock whether a process still holds it."""
    (tmp_path / "history.json").write_text(json.dumps(_history([0.5], status="running")))
    assert report(tmp_path).startswith("status: stopped without a word (killed, crashed")
    with run_files.exclusive(tmp_path):  # as a training process holds it
        assert report(tmp_path).startswith("status: running\n")
    assert "stopped without a word" in report(tmp_path)  # released with its holder


def _with_paths(history, **paths):
    """``history`` trained on one machine whose auto took ``paths`` (class -> path) by timing."""
    taken = {
        key.replace("_", " "): {"path": path, "ms": {"fused_cpu": 0.178, "xla": 0.064}}
        for key, path in paths.items()
    }
    return {**history, "machines": [{"cpu_model": "a CPU", "auto_paths": taken}]}


def test_the_report_names_the_paths_auto_took_and_where_two_runs_differ(tmp_path, capsys):
    """A run's report lists what auto took by timing; two runs compared show the classes they
    took differently, which is where their numbers may part."""
    a = _run(tmp_path, "a", _with_paths(_history([0.83]), layer_norm="fused_cpu", gru="xla"))
    b = _run(tmp_path, "b", _with_paths(_history([0.84]), layer_norm="xla", gru="xla"))
    assert report(a).splitlines()[-3:] == [
        "paths auto took by timing (shape class: path, both times):",
        "- gru: xla (fused_cpu 0.178, xla 0.064 ms)",
        "- layer norm: fused_cpu (fused_cpu 0.178, xla 0.064 ms)",
    ]
    assert cli.main(["report", str(a), "--against", str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines.index("| class auto took differently | a | b |")
    assert lines[table + 2 :][:2] == [
        "| layer norm | fused_cpu (fused_cpu 0.178, xla 0.064 ms) | xla (fused_cpu 0.178, xla "
        "0.064 ms) |",
        "",
    ]
    c = _run(tmp_path, "c", _with_paths(_history([0.85]), layer_norm="fused_cpu", gru="xla"))
    assert "auto took the same path in all 2 timed classes the runs share." in report(a, (c,))


def test_the_report_names_each_machine_and_commit_that_trained_the_run(tmp_path):
    """A run resumed on another machine, under other code and a kernel build target, names
    both; a record from before the fields existed gives what it has."""
    full = {
        "cpu_model": "Intel(R) Xeon(R) Processor",
        "cpu_family_model": "6/167",
        "cpu_count": 2,
        "usable_cores": 1,
        "cpu_features": {"avx2": True, "avx512f": True, "amx_tile": False},
        "jax": "0.10.2",
        "commit": "abc1234+changes",
        "date": "2026-12-06",
        "env": {"HW2JAX_KERNEL_MARCH": "x86-64-v3", "GLIBC_TUNABLES": "glibc.malloc." + "x" * 40},
    }
    installed = {**full, "usable_cores": 2, "commit": None, "env": {}}
    old = {"cpu_model": "AMD EPYC 9R14 96-Core Processor", "cpu_count": 2, "jax": "0.10.0"}
    run = _run(tmp_path, "r", {**_history([0.8]), "machines": [old, installed, full]})
    assert report(run).splitlines()[-4:] == [
        "trained on:",
        "- AMD EPYC 9R14 96-Core Processor, 2 cores; jax 0.10.0",
        "- Intel(R) Xeon(R) Processor (family/model 6/167), 2 cores, avx2 avx512f; jax 0.10.2, "
        "commit unknown (not a checkout), from 2026-12-06",
        "- Intel(R) Xeon(R) Processor (family/model 6/167), 2 cores (1 usable), avx2 avx512f; "
        "jax 0.10.2, commit abc1234+changes, from 2026-12-06, settings "
        "HW2JAX_KERNEL_MARCH=x86-64-v3, GLIBC_TUNABLES",
    ]
