"""The commands the other tests reach only through the API, run through the command line:
`data locate`, `vit eval` of the best and of the latest checkpoint, `mqar train`,
`mqar sweep` and `--devices`."""

import json
import subprocess
import sys

import pytest
from conftest import assert_same_metrics, fresh_process_env
from test_mqar import CONFIG as MQAR_CONFIG
from test_reliability import cli_args

from hw2jax import cli

TINY_MQAR = ["seq_len=16", "num_pairs=2", "vocab_size=16", "train_size=64", "test_size=32"]
TINY_MQAR += ["batch_size=16", "eval_batch_size=32", "model.dim=32", "model.heads=2"]
TINY_MQAR += ["progress=False"]


def _sets(items):
    return [a for item in items for a in ("--set", item)]


@pytest.mark.parametrize(
    "args,message",
    [
        (["sentiment"], "hw2jax sentiment: error: the following arguments are required: ACTION"),
        (["data"], "hw2jax data: error: the following arguments are required: ACTION"),
        ([], "hw2jax: error: the following arguments are required: COMMAND"),
        (["sentiment", "pack", "--config", "c.py"], "arguments are required: --out"),
        (["vit", "train", "--config", "c.py"], "arguments are required: --workdir"),
        (["vit", "train", "--workdir", "w"], "arguments are required: --config"),
        (["sentiment", "pack", "--out", "o"], "arguments are required: --config"),
        (["vit", "eval"], "arguments are required: --workdir"),
        (["vit"], "hw2jax vit: error: the following arguments are required: ACTION"),
        (["mqar"], "hw2jax mqar: error: the following arguments are required: ACTION"),
        (["theory", "--lengths", "256,0"], "lengths must be positive, got '256,0'"),
        (["theory", "--lengths", "256,x"], "expected comma-separated integers, got '256,x'"),
    ],
)
def test_a_missing_command_or_bad_argument_is_the_parsers_one_error(capsys, args, message):
    with pytest.raises(SystemExit) as ended:
        cli.main(args)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and message in err and "Traceback" not in err


def test_flags_parse_to_what_the_commands_read():
    parse = cli.build_parser().parse_args
    assert parse(["theory", "--lengths", "1,8"]).lengths == (1, 8)  # 1 is positive
    train = ["sentiment", "train", "--config", "c.py", "--workdir", "w"]
    assert parse(train).cache_features is None  # unset: the config's own value stands
    assert parse([*train, "--cache-features"]).cache_features is True


@pytest.mark.parametrize(
    "flags, started",
    [
        ([], None),
        (["--distributed"], (None, None, None)),  # jax detects the rest (SLURM, MPI, TPU)
        (["--coordinator", "h:1"], ("h:1", None, None)),
        (["--num-processes", "2", "--process-id", "1"], (None, 2, 1)),
        (["--host-devices", "3"], ("split", 3)),  # the CPU shown to jax as 3 devices
    ],
)
def test_runtime_flags_start_what_they_name_before_the_config_is_read(
    monkeypatch, tmp_path, capsys, flags, started
):
    """Any one flag of several processes starts the distributed runtime; --host-devices splits
    the CPU. Both before the config is read (a missing one ends the command right after)."""
    from hw2jax.train import sharding

    calls = []
    monkeypatch.setattr(sharding, "initialize_distributed", lambda *a: calls.append(a))
    monkeypatch.setattr(sharding, "split_host_cpu", lambda n: calls.append(("split", n)))
    train = ["vit", "train", "--config", str(tmp_path / "none.py"), "--workdir", str(tmp_path)]
    assert cli.main([*train, *flags]) == 2
    assert calls == ([started] if started else [])
    assert "none.py" in capsys.readouterr().err


def test_a_sweep_or_ablation_stopped_short_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """Stopped short (a signal), `mqar sweep` and `vit ablate` say how to resume and exit 130;
    with every run done they print the table and exit 0. A sweep's runs are its mixers x
    lengths x dims, an ablation's the recipe's and one per variant."""
    from test_ablation import SHIPPED

    from hw2jax.config import load_config
    from hw2jax.tasks import mqar, vit

    for name in ("results.md", "ablation.md"):
        (tmp_path / name).write_text(f"| {name} |\n")
    grid = ["sweep.mixers=('softmax', 'linear')", "sweep.seq_lens=(64, 128, 256)"]
    grid += ["sweep.dims=(32, 64)"]
    sweep = ["mqar", "sweep", "--config", MQAR_CONFIG, "--workdir", str(tmp_path)]
    ablate = ["vit", "ablate", "--config", str(SHIPPED), "--workdir", str(tmp_path)]
    runs = 1 + len(load_config(SHIPPED).ablation)
    for command, module, fn, expected, table in [
        ([*sweep, *_sets(grid)], mqar, "sweep", 12, "results.md"),
        (ablate, vit, "ablate", runs, "ablation.md"),
    ]:
        for done in (expected - 1, expected):
            monkeypatch.setattr(module, fn, lambda config, workdir, n=done: [{}] * n)
            finished = done == expected
            assert cli.main(command) == (0 if finished else 130)
            assert capsys.readouterr().out == (
                f"| {table} |\n"
                if finished
                else f"Stopped after {done} of {expected} runs; run the same command to resume.\n"
            )


def test_data_locate_names_the_folder_or_every_place_tried(fashion_dir, tmp_path, capsys):
    assert cli.main(["data", "locate", "--data-dir", str(fashion_dir)]) == 0
    out = capsys.readouterr().out.strip()
    assert str(fashion_dir) in out and "idx" in out
    assert cli.main(["data", "locate", "--data-dir", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()  # one error: the places tried, the ways to fix it
    assert err.startswith("hw2jax: error: FashionMNIST not found. Tried:")
    assert str(tmp_path / "nothing") in err and "Traceback" not in err


def test_vit_eval_reads_the_best_or_the_latest_checkpoint(fashion_dir, tmp_path, capsys):
    """With the best epoch not the last (a learning rate that overshoots after epoch 1), eval
    scores the best epoch's params by default and the last epoch's with --latest, each as the
    history recorded it."""
    run = tmp_path / "run"
    args = cli_args(fashion_dir, run, "epochs=3", "learning_rate=0.3")
    assert cli.main(args) == 0
    history = json.loads((run / "history.json").read_text())
    scores = [r["test_accuracy"] for r in history["epochs"]]
    capsys.readouterr()
    assert cli.main(["vit", "eval", "--workdir", str(run)]) == 0
    best = json.loads(capsys.readouterr().out)
    assert cli.main(["vit", "eval", "--workdir", str(run), "--latest"]) == 0
    latest = json.loads(capsys.readouterr().out)
    assert best["accuracy"] == pytest.approx(max(scores), abs=1e-6)
    assert latest["accuracy"] == pytest.approx(scores[-1], abs=1e-6)
    if max(scores) != scores[-1]:  # the two checkpoints differ: the flag chose between them
        assert best["accuracy"] != latest["accuracy"]


def test_mqar_train_and_sweep_through_the_command_line(tmp_path, capsys):
    train = ["mqar", "train", "--config", MQAR_CONFIG, "--workdir", str(tmp_path / "one")]
    assert cli.main([*train, "--epochs", "1", *_sets(TINY_MQAR)]) == 0
    history = json.loads((tmp_path / "one" / "history.json").read_text())
    assert history["status"] == "done" and history["unit"] == "sequences"
    assert history["config"]["seq_len"] == 16 and len(history["epochs"]) == 1
    sweep = ["mqar", "sweep", "--config", MQAR_CONFIG, "--workdir", str(tmp_path / "sweep")]
    grid = ["sweep.mixers=('softmax', 'linear')", "sweep.seq_lens=(16,)", "sweep.dims=(32,)"]
    capsys.readouterr()
    assert cli.main([*sweep, "--epochs", "1", *_sets(TINY_MQAR + grid)]) == 0
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert capsys.readouterr().out.endswith(table)  # the command prints it last
    assert "| softmax | 32 |" in table and "| linear | 32 |" in table
    for name in ("softmax_T16_d32", "linear_T16_d32"):
        run = json.loads((tmp_path / "sweep" / name / "history.json").read_text())
        assert run["status"] == "done"


@pytest.mark.slow
def test_devices_flag_trains_like_one_device(small_vit_run, tmp_path):
    """`--host-devices 2 --devices all` in a fresh process: each batch split over two devices,
    the same metrics as one device."""
    one = small_vit_run.workdir
    two = tmp_path / "two"
    args = [*cli_args(small_vit_run.data, two, "epochs=3"), "--host-devices", "2"]
    args += ["--devices", "all"]
    code = f"from hw2jax import cli; raise SystemExit(cli.main({args!r}))"
    env = fresh_process_env()
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (json.loads((w / "history.json").read_text()) for w in (one, two))
    assert b["config"]["devices"] == "all" and a["config"]["devices"] == "1"
    assert_same_metrics(b["epochs"], a["epochs"])
