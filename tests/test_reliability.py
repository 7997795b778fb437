"""Runs that survive damage and preemption: damaged checkpoints fall back to an older one,
SIGTERM saves like Ctrl-C, a time-based save bounds what kill -9 costs, and history.json says
what happened."""

import json
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import fresh_process_env
from test_train_vit import CONFIG, SMALL_MODEL, final_params, small_config

from hw2jax import cli
from hw2jax.tasks import vit
from hw2jax.train import steps as train_steps
from hw2jax.train.checkpoints import CheckpointError, Checkpoints
from hw2jax.train.sharding import DataParallel


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def cli_args(fashion_dir, workdir, *overrides):
    """The command line of small_config's run."""
    items = [*SMALL_MODEL, "batch_size=40", "eval_batch_size=16", "progress=False"]
    items += ["log_every_steps=2", "learning_rate=3e-3", *overrides]
    args = ["vit", "train", "--config", str(CONFIG), "--workdir", str(workdir)]
    args += ["--data-dir", str(fashion_dir)]
    for item in items:
        args += ["--set", item]
    return args


def steps(workdir):
    folder = workdir / "checkpoints" / "latest"
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
    )


@pytest.fixture(scope="module")
def straight(small_vit_run):
    """An uninterrupted 3-epoch run (3 steps per epoch) to compare resumed runs with."""
    return small_vit_run.data, final_params(small_vit_run.workdir, small_vit_run.config)


@pytest.fixture(scope="module")
def two_epochs(straight, tmp_path_factory):
    """The same run stopped after 2 epochs (latest steps 3 and 6); tests damage copies of it."""
    run = tmp_path_factory.mktemp("two_epochs") / "run"
    vit.train_and_evaluate(small_config(straight[0], "epochs=2"), run)
    return run


def copy_run(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("damage", ["a data file", "_METADATA"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(
    straight, two_epochs, tmp_path, capfd, damage
):
    data, expected = straight
    run = copy_run(two_epochs, tmp_path)
    assert steps(run) == [3, 6]  # the two newest are kept
    newest = run / "checkpoints" / "latest" / "6" / "default"
    if damage == "_METADATA":
        victim = newest / "_METADATA"
    else:
        victim = max(
            (p for p in newest.rglob("*") if p.is_file() and p.parent.name == "d"),
            key=lambda p: p.stat().st_size,
        )
    victim.unlink()
    out = vit.train_and_evaluate(small_config(data), run)  # resume for the third epoch
    err = capfd.readouterr().err
    assert (
        "checkpoint step 6 in" in err and "cannot be read" in err and "trying the one before" in err
    )
    assert len([line for line in err.splitlines() if "cannot be read" in line]) == 1
    assert out["status"] == "done" and len(out["epochs"]) == 3
    assert (run / "checkpoints" / "damaged").exists()
    assert steps(run) == [6, 9]  # 6 written again, then 9: still the two newest only
    # Epoch 2 was redone from step 3: the result is that of an uninterrupted run.
    assert_same_params(final_params(run, small_config(data)), expected)


def test_no_readable_checkpoint_says_how_to_start_over(straight, two_epochs, tmp_path):
    data, _ = straight
    run = copy_run(two_epochs, tmp_path)
    for step in (3, 6):
        (run / "checkpoints" / "latest" / str(step) / "default" / "_METADATA").unlink()
    with pytest.raises(CheckpointError, match=r"can be read .* To start over, delete .*--workdir"):
        vit.train_and_evaluate(small_config(data), run)


# Six evaluations of a damaged checkpoint in one process, the garbage collected after each:
# orbax's leftovers (logged, unraisable and warned errors) then print within the run, not at
# some later collection. Then an unraisable error of another origin, which must still print.
_EVAL_DAMAGED = """
import gc, sys
from hw2jax import cli
for _ in range(6):
    code = cli.main(sys.argv[1:])
    gc.collect()
print("-- then --", file=sys.stderr, flush=True)
class Other:
    def __del__(self):
        raise ValueError("not orbax's")
Other()
raise SystemExit(code)
"""


def test_eval_of_a_damaged_best_checkpoint_is_one_clear_line(straight, two_epochs, tmp_path):
    """The command's whole error output, to its exit, is one line naming the array and the
    damage: nothing of orbax's failed reads is printed after it."""
    run = copy_run(two_epochs, tmp_path)
    (best,) = (run / "checkpoints" / "best").glob("[0-9]*")
    data_files = [p for p in best.rglob("*") if p.is_file() and p.parent.name == "d"]
    max(data_files, key=lambda p: p.stat().st_size).unlink()  # the biggest array's bytes
    done = subprocess.run(
        [sys.executable, "-c", _EVAL_DAMAGED, "vit", "eval", "--workdir", str(run)],
        env=fresh_process_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    ours, then = done.stderr.split("-- then --\n")
    lines = [line for line in ours.splitlines() if "FashionMNIST" not in line]
    assert len(lines) == 6, done.stderr[-3000:]
    assert "Exception ignored in" in then and "ValueError: not orbax's" in then
    for line in lines:
        assert line.startswith(f"hw2jax: error: the best checkpoint (step {best.name})")
        assert 'Error reading "params.' in line and "TensorStore" not in line
        assert "--latest" in line


@pytest.mark.slow
def test_sigterm_saves_and_exits_like_ctrl_c(straight, tmp_path):
    """A real SIGTERM, sent after step 4 of 9 (from inside the run, so it cannot end first)."""
    data, expected = straight
    run = tmp_path / "run"
    args = cli_args(data, run, "epochs=3", "checkpoint_every_minutes=0")
    done = start_signalling(args, after_step=4, signals=(signal.SIGTERM,))
    assert done.returncode == 143, done.stderr[-2000:]
    assert "SIGTERM: saving a checkpoint after this step" in done.stdout
    assert steps(run)[-1] == 5 and "Traceback" not in done.stderr
    history = json.loads((run / "history.json").read_text())
    assert history["status"] == "interrupted"
    # The run goes on from its checkpoint and ends as an uninterrupted one.
    out = vit.train_and_evaluate(small_config(data), run)
    assert out["status"] == "done"
    assert_same_params(final_params(run, small_config(data)), expected)


@pytest.mark.slow
def test_kill_9_after_a_mid_epoch_save_loses_nothing_before_it(straight, tmp_path, capfd):
    data, expected = straight
    run = tmp_path / "run"
    # A save at every read point (every 2 steps here): some fall inside an epoch (3 steps).
    # kill -9 from inside the run after step 8, so that it cannot end first; the save of step
    # 4 is on disk by then (the epoch-end save of step 6 waited for it).
    args = cli_args(data, run, "epochs=3", "checkpoint_every_minutes=1e-6")
    done = start_signalling(args, after_step=8, signals=(signal.SIGKILL,))
    assert done.returncode == -signal.SIGKILL
    mid_epoch = max(s for s in steps(run) if s % 3)
    assert mid_epoch >= 4
    history = json.loads((run / "history.json").read_text())
    assert history["status"] == "running"  # it never finished, and does not claim to have
    out = vit.train_and_evaluate(small_config(data), run)
    printed = capfd.readouterr()
    resumed_from = int((printed.out + printed.err).split("Resuming from step ")[1].split()[0])
    assert resumed_from >= mid_epoch and out["status"] == "done"
    assert_same_params(final_params(run, small_config(data)), expected)


def test_history_says_failed_with_the_reason(straight, tmp_path, monkeypatch):
    data, _ = straight

    def broken_evaluate(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(train_steps, "evaluate", broken_evaluate)
    with pytest.raises(RuntimeError, match="disk full"):
        vit.train_and_evaluate(small_config(data, "epochs=2"), tmp_path / "run")
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["status"] == "failed: RuntimeError: disk full"


def test_one_process_per_workdir_and_the_lock_dies_with_its_holder(fashion_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = (
        "import sys, time; from pathlib import Path; from hw2jax.train import run_files\n"
        "with run_files.exclusive(Path(sys.argv[1])):\n"
        "    print('held', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(workdir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(cli_args(fashion_dir, workdir, "epochs=1")) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"hw2jax: error: {workdir} is in use by another training process (PID "
            f"{holder.pid}); wait for it to end, stop it (Ctrl-C saves a checkpoint), or pass "
            "another --workdir."
        )
        assert not (workdir / "config.json").exists()  # refused before writing anything
    finally:
        holder.kill()  # as kill -9: no cleanup runs, the OS drops the lock
        holder.wait()
    assert cli.main(cli_args(fashion_dir, workdir, "epochs=1")) == 0


def test_a_workdir_that_is_a_file_is_one_line(fashion_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(cli_args(fashion_dir, tmp_path / "file", "epochs=1")) == 2
    assert capsys.readouterr().err.strip() == (
        f"hw2jax: error: --workdir {tmp_path / 'file'} is a file, not a folder; pass a folder's "
        "path."
    )


def test_a_checkpoint_of_another_model_is_refused_not_set_aside(fashion_dir, tmp_path, capsys):
    """Resuming with a config that builds another model is no damage: nothing is moved, and
    one line says what differs and how to go on."""
    workdir = tmp_path / "run"
    assert cli.main(cli_args(fashion_dir, workdir, "epochs=1")) == 0
    before = json.loads((workdir / "history.json").read_text())
    capsys.readouterr()
    # config.json is the record of what was trained: another recipe is refused by name...
    assert cli.main(cli_args(fashion_dir, workdir, "epochs=1", "model.dim=24")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"hw2jax: error: {workdir} holds a run trained with another config (model.dim: 16 -> 24)"
        ". Run the same command as before to resume it (or add --set model.dim=16 to this one), "
        "or pass a new --workdir to train the new one."
    )
    # The named --set, added, resumes it.
    assert cli.main(cli_args(fashion_dir, workdir, "epochs=1", "model.dim=24", "model.dim=16")) == 0
    assert json.loads((workdir / "history.json").read_text())["epochs"] == before["epochs"]
    capsys.readouterr()
    # ...also when config.json is lost or damaged: its copy in the history is the record...
    for damage in ("delete", "garble"):
        if damage == "delete":
            (workdir / "config.json").unlink()
        else:
            (workdir / "config.json").write_text('{"epochs": 1, "mod')
        assert cli.main(cli_args(fashion_dir, workdir, "epochs=1", "model.dim=24")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0] == f"{workdir / 'config.json'} is missing or damaged; its copy in " + (
            f"{workdir / 'history.json'} is used."
        )
        assert "trained with another config (model.dim: 16 -> 24)" in err[1]
    # ...and without any record, by the checkpoint's shapes.
    (workdir / "config.json").unlink()
    history = (workdir / "history.json").read_text()
    (workdir / "history.json").unlink()
    assert cli.main(cli_args(fashion_dir, workdir, "epochs=1", "model.dim=24")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds another model or optimizer than this config builds" in err
    assert "e.g. opt_state/1/mu/block0/attn/to_out/bias (16,) in the checkpoint, (24,) now" in err
    assert not (workdir / "checkpoints" / "damaged").exists()
    assert Checkpoints(workdir / "checkpoints").latest_step() == before["epochs"][-1]["step"]
    assert json.loads(history)["config"] == before["config"]


def start_signalling(args, after_step, signals, last_during_save=False, during_compile=False):
    """The CLI in a child process that sends itself real ``signals`` at a known moment, so the
    run cannot end first: after step ``after_step``; with ``last_during_save``, the last one
    while the stop's checkpoint is being written; with ``during_compile``, 0.1 s apart from
    0.1 s into the first step's tracing and compilation."""
    code = f"""
import os, signal, sys, threading, time
from hw2jax import cli
from hw2jax.train import checkpoints, hooks, steps
signals = {[int(s) for s in signals]!r}
armed = []
def send(s):
    os.kill(os.getpid(), s)
class Send(hooks.Hook):
    def after_step(self, run):
        if run.step == {after_step}:
            for s in signals[:{-1 if last_during_save else len(signals)}]:
                send(s)
            armed.append(1)
default_hooks = hooks.default_hooks
hooks.default_hooks = lambda config: [*default_hooks(config), Send()]
wait = checkpoints.Checkpoints.wait
def wait_signalled(self, step=None):
    if armed and {last_during_save!r}:
        armed.clear()
        send(signals[-1])
        time.sleep(0.05)  # the handler has run: the write is still ahead
    return wait(self, step)
checkpoints.Checkpoints.wait = wait_signalled
make_train_step = steps.make_train_step
def make_signalled(*a, **k):
    step = make_train_step(*a, **k)
    def first(*b):
        for i, s in enumerate(signals):
            threading.Timer(0.1 * (i + 1), send, (s,)).start()
        return step(*b)
    return first if {during_compile!r} else step
steps.make_train_step = make_signalled
raise SystemExit(cli.main({args!r}))
"""
    env = fresh_process_env()
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals, code",
    [
        ((signal.SIGTERM, signal.SIGINT), 143),  # SIGTERM exits 143 whatever follows it
        ((signal.SIGINT, signal.SIGTERM), 130),
        ((signal.SIGTERM, signal.SIGTERM), 143),
    ],
)
def test_a_second_signal_during_the_stop_save_waits_for_it(straight, tmp_path, signals, code):
    data, expected = straight
    run = tmp_path / "run"
    args = cli_args(data, run, "epochs=3", "checkpoint_every_minutes=0")
    done = start_signalling(args, after_step=4, signals=signals, last_during_save=True)
    assert done.returncode == code, done.stderr[-3000:]
    assert "a checkpoint is being written; waiting for it to finish" in done.stdout
    assert "Stopped at step 5" in done.stdout and "Traceback" not in done.stderr
    assert steps(run)[-1] == 5  # the stop's checkpoint was written, then announced
    history = json.loads((run / "history.json").read_text())
    assert history["status"] == "interrupted" and "aborted" not in history
    out = vit.train_and_evaluate(small_config(data), run)
    assert out["status"] == "done"
    assert_same_params(final_params(run, small_config(data)), expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals, code",
    [((signal.SIGTERM, signal.SIGINT), 143), ((signal.SIGINT, signal.SIGINT), 130)],
)
def test_a_second_signal_between_saves_ends_at_once_naming_the_resume_step(
    straight, tmp_path, signals, code
):
    data, expected = straight
    run = tmp_path / "run"
    args = cli_args(data, run, "epochs=3", "checkpoint_every_minutes=0")
    # Two epochs of 3 steps saved (steps 3 and 6, both kept): the newer is named.
    done = start_signalling(args, after_step=7, signals=signals)
    assert done.returncode == code, done.stderr[-3000:]
    assert "again: stopped at once, without saving; a rerun resumes from step 6." in done.stdout
    assert "Traceback" not in done.stderr and steps(run)[-2:] == [3, 6]
    history = json.loads((run / "history.json").read_text())
    assert history["status"] == "interrupted"
    assert history["aborted"]["resume_step"] == 6
    out = vit.train_and_evaluate(small_config(data), run)
    assert out["status"] == "done"
    assert_same_params(final_params(run, small_config(data)), expected)


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(3))
def test_two_signals_during_the_first_compile_never_crash(straight, tmp_path, attempt):
    """Before, the second raised KeyboardInterrupt inside jax's tracing: exit 139."""
    data, _ = straight
    run = tmp_path / "run"
    args = cli_args(data, run, "epochs=3", "checkpoint_every_minutes=0")
    done = start_signalling(
        args, after_step=-1, signals=(signal.SIGINT, signal.SIGINT), during_compile=True
    )
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    history = json.loads((run / "history.json").read_text())
    assert history["status"] == "interrupted"


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_recorded_not_announced(straight, tmp_path):
    """With the shell's file-size limit below a checkpoint's size (ulimit -f), the run ends
    with one line naming the step and the fix; the history lists the failed save and no epoch
    without a checkpoint, and does not say running. A rerun without the limit goes on."""
    data, expected = straight
    run = tmp_path / "run"
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))\n"
        f"from hw2jax import cli; raise SystemExit(cli.main({cli_args(data, run)!r}))"
    )
    env = fresh_process_env()
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]
    # One line of ours. (Other threads may print into the middle of the output.)
    ours = re.findall(r"hw2jax: error: [^\n]*", done.stderr)
    assert len(ours) == 1
    assert ours[0].startswith("hw2jax: error: the checkpoint of step 3 could not be written in ")
    assert "then run the same command again: it resumes from the start." in ours[0]
    # No traceback from this package, from orbax, or from TensorStore's callbacks (asyncio's
    # "Event loop is closed" for each write cut short).
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "saved" not in done.stdout
    history = json.loads((run / "history.json").read_text())
    assert history["status"].startswith("failed: CheckpointWriteError: the checkpoint of step 3")
    assert [f["step"] for f in history["failed_saves"]] == [3]
    assert history["epochs"] == [] and steps(run) == []
    out = vit.train_and_evaluate(small_config(data), run)
    assert out["status"] == "done" and out["failed_saves"][0]["step"] == 3
    assert_same_params(final_params(run, small_config(data)), expected)


def test_a_lost_history_keeps_the_best_checkpoint_and_its_score(
    straight, two_epochs, tmp_path, capfd
):
    """history.json deleted: the run resumes, the best epoch's record comes back from the best
    checkpoint, and only a better evaluation replaces it."""
    run = copy_run(two_epochs, tmp_path)
    best_before = Checkpoints(run / "checkpoints").best_metrics()
    (run / "history.json").unlink()
    # The best checkpoint's saved score made unbeatable: epoch 3 must not replace it.
    metrics = next((run / "checkpoints" / "best").glob("*/metrics/metrics"))
    json.dump({**best_before, "test_accuracy": 1.0}, metrics.open("w"))
    out = vit.train_and_evaluate(small_config(straight[0]), run)
    assert "history.json is missing; resuming from step 6 with only the best epoch's record" in (
        capfd.readouterr().err
    )
    assert out["status"] == "done" and [r["epoch"] for r in out["epochs"]] == [2, 3]
    ckpt = Checkpoints(run / "checkpoints")
    assert ckpt.best_metrics()["step"] == best_before["step"]  # kept
    ckpt.close()


def test_best_holds_the_best_epochs_parameters_and_score(straight, tmp_path):
    """The best checkpoint is the epoch with the highest best_metric, its params score what
    the history says, and they differ from the last epoch's when that one is not the best."""
    data, _ = straight
    config = small_config(data, "epochs=4")
    out = vit.train_and_evaluate(config, tmp_path / "run")
    scores = [r["test_accuracy"] for r in out["epochs"]]
    best_epoch = out["epochs"][int(np.argmax(scores))]
    task = vit.ViTTask(config, *vit.load_data(config))
    ckpt = Checkpoints(tmp_path / "run" / "checkpoints")
    params, metrics = ckpt.restore_best_params(task.init_params(jax.random.key(0)))
    ckpt.close()
    assert metrics["step"] == best_epoch["step"]
    evaluated = train_steps.evaluate(
        task, params, "test", train_steps.make_eval_step(task), DataParallel(1, 40, 16)
    )
    np.testing.assert_allclose(evaluated["accuracy"], best_epoch["test_accuracy"], rtol=1e-6)
