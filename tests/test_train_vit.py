"""The shared training loop, driven by the ViT experiment on tiny generated data."""

import json
import os
import signal
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SignalAfter, assert_names_its_machine, untimed

from hw2jax import cli
from hw2jax.attention import dispatch
from hw2jax.config import apply_overrides, load_config
from hw2jax.data import fashion_mnist
from hw2jax.tasks import vit
from hw2jax.train import checkpoints, hooks, loop, plots, run_files, steps
from hw2jax.train.batching import IndexBatches, chunk

CONFIG = Path(__file__).parents[1] / "experiments" / "vit_fashion_mnist.py"
SMALL_MODEL = [
    "model.patch_size=7",
    "model.dim=16",
    "model.depth=2",
    "model.heads=2",
    "model.dim_head=8",
    "model.mlp_dim=24",
]


def small_config(data_dir, *overrides):
    config = load_config(CONFIG)
    apply_overrides(
        config,
        [
            *SMALL_MODEL,
            f"data_dir={data_dir}",
            "batch_size=40",
            "eval_batch_size=16",
            "epochs=3",
            "progress=False",
            "log_every_steps=2",
            "learning_rate=3e-3",
            *overrides,
        ],
    )
    return config


def final_params(workdir, config):
    train, test = vit.load_data(config)
    return loop.latest_params(vit.ViTTask(config, train, test), config, workdir)


def test_device_batches_cover_every_example_once():
    n, b = 103, 16
    data = {"label": jnp.arange(n)}
    order = np.random.default_rng(0).permutation(n)
    batches = IndexBatches(data, chunk(order, b), b)
    assert len(batches) == 7  # 6 full batches and one of 7
    seen = np.concatenate([np.asarray(x["label"])[np.asarray(x["mask"]) > 0] for x in batches])
    assert sorted(seen.tolist()) == list(range(n))
    assert float(sum(x["mask"].sum() for x in batches)) == n


def test_training_learns_and_writes_history_plots_and_results(fashion_dir, tmp_path):
    config = small_config(fashion_dir, "epochs=20")
    start = time.perf_counter()
    out = vit.train_and_evaluate(config, tmp_path / "run")
    wall = time.perf_counter() - start
    epochs = out["epochs"]
    assert [r["epoch"] for r in epochs] == list(range(1, 21))
    # Epoch times by the clock, inside the call's own; each rate is the 96 images over its time.
    assert all(r["train_time_s"] > 0 for r in epochs)
    assert sum(r["train_time_s"] for r in epochs) < wall
    for r in epochs:
        assert r["images_per_s"] * r["train_time_s"] == pytest.approx(96)
    # The classes are separable bands; chance is 10 %.
    assert out["final"]["test_accuracy"] >= 0.9
    assert out["final"]["test_count"] == 40  # all test images, the partial batch included
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    saved = json.loads((tmp_path / "run" / "history.json").read_text())
    assert saved["status"] == "done" and len(saved["epochs"]) == 20
    # Train loss was logged every 2 steps (3 steps per epoch: 2 full batches and one of 16).
    assert [r["step"] for r in saved["train"]][:4] == [2, 3, 4, 6]
    for name in ("curves.png", "confusion_matrix.png", "test_predictions.png", "results.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert np.sum(results["confusion_matrix"]) == 40
    assert len(results["machines"]) == 1
    assert_names_its_machine(results["machines"][0])
    # The report's accuracy agrees with the loop's evaluation of the same (final) params.
    assert results["test_accuracy"] == pytest.approx(epochs[-1]["test_accuracy"])


def test_the_logged_train_loss_is_the_mean_cross_entropy_of_the_images_seen(fashion_dir, tmp_path):
    """At a learning rate of 1e-9 the parameters stay put, so each logged loss is the float64
    cross-entropy of the final parameters' logits, averaged over the step's images, and the
    epoch's is the average over all 96."""
    config = small_config(fashion_dir, "epochs=1", "log_every_steps=1", "learning_rate=1e-9")
    out = vit.train_and_evaluate(config, tmp_path / "run")
    train, test = vit.load_data(config)
    task = vit.ViTTask(config, train, test)
    params = loop.latest_params(task, config, tmp_path / "run")
    per_step = []
    for batch in task.train_batches(0):
        logits = np.asarray(task.apply(params, batch, train=True, rng=None), np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        losses = -log_p[np.arange(len(logits)), np.asarray(batch["label"])]
        mask = np.asarray(batch["mask"]) > 0
        per_step.append(losses[mask])
    rows = out["train"]
    assert [(r["step"], r["examples"]) for r in rows] == [(1, 40), (2, 40), (3, 16)]
    for row, losses in zip(rows, per_step, strict=True):
        assert row["loss"] == pytest.approx(losses.mean(), rel=1e-5)
    every = np.concatenate(per_step)
    assert out["epochs"][0]["train_loss"] == pytest.approx(every.mean(), rel=1e-5)


def test_a_run_records_the_paths_auto_took_by_timing(fashion_dir, tmp_path, monkeypatch):
    """Each shape class auto decided by its timings while the run trained, with the path taken
    and the milliseconds, is kept in this machine's entry of the history and the results: with
    XLA's forms timed faster, XLA's forms; with the kernels faster, the kernels."""
    from hw2jax import kernels
    from hw2jax.attention import dispatch

    if kernels.build_error():
        pytest.skip(f"the fused CPU kernel cannot be built here: {kernels.build_error()}")
    monkeypatch.setenv("HW2JAX_AUTO", "measure")
    xla = ("xla", "naive", "chunked", "blockwise")
    wide = ["model.dim=32", "model.dim_head=16", "epochs=1"]  # widths the kernels take
    recorded = []
    for fast in ("xla", "kernels"):
        monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
        monkeypatch.setattr(dispatch, "cache_file", lambda f=fast: tmp_path / f"{f}.json")

        def fake(paths, measure, gradient, rule=None, fast=fast):
            return {p: (1 if (p in xla) == (fast == "xla") else 5) / 1e3 for p in paths}

        monkeypatch.setattr(dispatch, "time_paths", fake)
        out = vit.train_and_evaluate(small_config(fashion_dir, *wide), tmp_path / fast)
        (entry,) = json.loads((tmp_path / fast / "results.json").read_text())["machines"]
        assert entry == out["machines"][0]
        taken = entry["auto_paths"]
        assert any(key.startswith("layer_norm fwd+bwd") for key in taken)
        for record in taken.values():
            assert record["ms"][record["path"]] == min(record["ms"].values())
        recorded.append({key: record["path"] for key, record in taken.items()})
    assert set(recorded[0]) == set(recorded[1])
    assert all(path in xla for path in recorded[0].values())
    assert not any(path in xla for path in recorded[1].values())


def test_a_run_names_the_settings_that_change_its_paths(monkeypatch):
    # A run with the kernels built for AVX2 computes other floats than the native build: its
    # results must say so, and a resume under other settings is recorded as another machine.
    from hw2jax import cpu
    from hw2jax.train import loop

    monkeypatch.setenv("HW2JAX_KERNEL_MARCH", "x86-64-v3")
    first, here = loop.with_this_machine([])
    assert len(first) == 1 and first[0]["env"]["HW2JAX_KERNEL_MARCH"] == "x86-64-v3"
    assert here == 0 and loop.with_this_machine(first) == (first, 0)
    monkeypatch.setenv("HW2JAX_KERNEL_MARCH", "native")
    moved, here = loop.with_this_machine(first)
    assert [m["env"]["HW2JAX_KERNEL_MARCH"] for m in moved] == ["x86-64-v3", "native"]
    assert here == 1
    # Resumed under taskset on one core of the same machine: another machine for its timings.
    all_cores = {0, 1}
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: all_cores)
    moved, _ = loop.with_this_machine(first)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    held, here = loop.with_this_machine(moved)
    assert [m["usable_cores"] for m in held] == [len(all_cores), len(all_cores), 1] and here == 2
    # A record from before the field: taken as one with all the machine's cores.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: all_cores)
    before = [{k: v for k, v in m.items() if k != "usable_cores"} for m in moved]
    assert loop.with_this_machine(before) == (before, 1)
    # Resumed after a change of code: an entry of its own, naming the commit.
    checkout = cpu.source_commit()
    monkeypatch.setattr(cpu, "source_commit", lambda: "abc1234+changes")
    changed, here = loop.with_this_machine(moved)
    assert here == 2 and changed[2]["commit"] == "abc1234+changes"
    assert [m["commit"] for m in changed[:2]] == [checkout] * 2


@pytest.mark.slow
def test_interrupted_run_resumes_bitwise(small_vit_run, tmp_path, sigint_handled):
    a = final_params(small_vit_run.workdir, small_vit_run.config)
    h1 = json.loads((small_vit_run.workdir / "history.json").read_text())

    # 3 steps per epoch. (signal after step, step it stops at): mid-epoch; during an epoch's
    # last step (it evaluates, then stops); a later epoch. One straight run for all.
    for signal_after, stop_at in ((1, 2), (2, 3), (7, 8)):
        resumed = tmp_path / f"resumed_{stop_at}"
        interrupted = small_config(small_vit_run.data)
        first = vit.train_and_evaluate(
            interrupted, resumed, extra_hooks=[SignalAfter(signal_after)]
        )
        assert first["status"] == "interrupted" and first["stopped_by"] == "Ctrl-C"
        assert checkpoints.Checkpoints(resumed / "checkpoints").latest_step() == stop_at
        second = vit.train_and_evaluate(interrupted, resumed)
        assert second["status"] == "done"

        b = final_params(resumed, interrupted)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
        h2 = json.loads((resumed / "history.json").read_text())
        assert h1["train"] == h2["train"]
        assert untimed(h1["epochs"]) == untimed(h2["epochs"])
        # An epoch resumed midway is timed from the resume, and its record says so.
        midway = {r["epoch"]: r["timed_from_step"] for r in h2["epochs"] if "timed_from_step" in r}
        assert midway == ({} if stop_at % 3 == 0 else {stop_at // 3 + 1: stop_at})
        assert not any("timed_from_step" in r for r in h1["epochs"])


class PoisonedTask(vit.ViTTask):
    """Feeds NaN images from the second epoch on, so the loss goes non-finite."""

    def apply(self, params, batch, *, train, rng):
        if train:
            batch = dict(batch, image=jnp.where(batch["poison"], jnp.nan, batch["image"] * 1.0))
        return super().apply(params, batch, train=train, rng=rng)

    def train_batches(self, epoch):
        batches = super().train_batches(epoch)
        return [dict(b, poison=jnp.asarray(epoch >= 1)) for b in batches]


# log_every_steps=100: the step sums are read back only at the epoch's end (step 6), and the
# message must still name the first non-finite step.
@pytest.mark.parametrize("log_every", [2, 100])
def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_good_checkpoint(
    fashion_dir, tmp_path, log_every
):
    config = small_config(fashion_dir, f"log_every_steps={log_every}")
    train, test = vit.load_data(config)
    task = PoisonedTask(config, train, test)
    with pytest.raises(hooks.TrainingDiverged, match=r"step 4 .*last good checkpoint \(step 3\)"):
        loop.train_and_evaluate(task, config, tmp_path / "run")
    assert checkpoints.Checkpoints(tmp_path / "run" / "checkpoints").latest_step() == 3
    assert json.loads((tmp_path / "run" / "history.json").read_text())["status"] == "diverged"


def test_cli_train_then_eval(fashion_dir, tmp_path, capsys, monkeypatch):
    args = [
        "vit",
        "train",
        "--epochs",
        "1",
        "--config",
        str(CONFIG),
        "--workdir",
        str(tmp_path / "w"),
        "--data-dir",
        str(fashion_dir),
        "--attention",
        "linear",
        "--set",
        "progress=False",
    ]
    for item in SMALL_MODEL:
        args += ["--set", item]
    assert cli.main(args) == 0
    saved = json.loads((tmp_path / "w" / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["model"]["attention"] == "linear"
    capsys.readouterr()
    assert cli.main(["vit", "eval", "--workdir", str(tmp_path / "w")]) == 0
    result = json.loads(capsys.readouterr().out)
    history = json.loads((tmp_path / "w" / "history.json").read_text())
    assert result["count"] == 40
    assert result["accuracy"] == pytest.approx(history["epochs"][0]["test_accuracy"])


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    code = cli.main(
        [
            "vit",
            "train",
            "--config",
            str(CONFIG),
            "--workdir",
            str(tmp_path),
            "--data-dir",
            str(tmp_path / "missing"),
            "--data-source",
            "idx",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "FashionMNIST not found" in err and "Traceback" not in err
    assert (
        cli.main(
            [
                "vit",
                "train",
                "--config",
                str(CONFIG),
                "--workdir",
                str(tmp_path),
                "--set",
                "modle.dim=3",
            ]
        )
        == 2
    )
    assert "unknown config key 'modle.dim'" in capsys.readouterr().err
    # eval and predict on a folder no run has used say which command makes one.
    assert cli.main(["vit", "eval", "--workdir", str(tmp_path / "none")]) == 2
    assert "work dir of `hw2jax vit train`" in capsys.readouterr().err
    assert cli.main(["sentiment", "predict", "--workdir", str(tmp_path / "none"), "good"]) == 2
    assert "work dir of `hw2jax sentiment train`" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model": {"dim": 64}}')  # as `vit train` writes
    assert cli.main(["sentiment", "predict", "--workdir", str(tmp_path), "good film"]) == 2
    assert "holds a run of another command" in capsys.readouterr().err


def test_one_epoch_on_tfds_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = small_config("", "epochs=1", "data_source=tfds")
    with tfds.testing.mock_data(num_examples=48):
        out = vit.train_and_evaluate(config, tmp_path / "run")
    assert out["status"] == "done" and len(out["epochs"]) == 1
    assert out["final"]["test_count"] == 48
    assert 0.0 <= out["epochs"][0]["test_accuracy"] <= 1.0


def test_normalisation_is_applied_inside_the_model_call(fashion_dir):
    # The task feeds (x/255 - 0.1307)/0.3081 to the network, as the assignment did.
    config = small_config(fashion_dir)
    train, test = vit.load_data(config)
    task = vit.ViTTask(config, train, test)
    params = task.init_params(jax.random.key(0))
    batch = task.eval_batches("test")[0]
    expected = task.model.apply(
        {"params": params}, fashion_mnist.normalize(batch["image"].astype(jnp.float32))
    )
    np.testing.assert_allclose(task.apply(params, batch, train=False, rng=None), expected)


def test_first_ctrl_c_requests_a_stop_a_second_waits_for_a_save_else_ends_at_once(
    sigint_handled, monkeypatch, tmp_path, capsys
):
    class Ended(Exception):
        pass

    def exit_now(code):
        raise Ended(code)

    monkeypatch.setattr(hooks.os, "_exit", exit_now)
    (tmp_path / "checkpoints" / "latest" / "6").mkdir(parents=True)  # committed
    (tmp_path / "checkpoints" / "latest" / "9.orbax-checkpoint-tmp-1").mkdir()  # being written
    run = types.SimpleNamespace(
        stop_requested=None,
        confirming_save=False,
        status="running",
        history={},
        ckpt=checkpoints.Checkpoints(tmp_path / "checkpoints"),
        save_history=lambda: None,
    )
    hook = hooks.StopOnSignal()
    hook.start(run)
    os.kill(os.getpid(), signal.SIGTERM)
    assert run.stop_requested == "SIGTERM"
    run.confirming_save = True  # a second signal while a checkpoint is written waits for it
    os.kill(os.getpid(), signal.SIGINT)
    assert "waiting for it to finish" in capsys.readouterr().out
    run.confirming_save = False
    with pytest.raises(Ended) as ended:  # otherwise it ends at once, with SIGTERM's code
        os.kill(os.getpid(), signal.SIGINT)
    assert ended.value.args == (143,)
    assert run.history["aborted"] == {"signal": "Ctrl-C", "resume_step": 6}
    assert run.status == "interrupted" and run.history["stopped_by"] == "SIGTERM"
    assert "a rerun resumes from step 6" in capsys.readouterr().out
    hook.close(run)
    run.ckpt.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    # Before any checkpoint is committed a rerun starts afresh: step 0.
    run.stop_requested, run.ckpt = None, checkpoints.Checkpoints(tmp_path / "none_yet")
    hook.start(run)
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(Ended) as ended:
        os.kill(os.getpid(), signal.SIGINT)
    assert ended.value.args == (130,)
    assert run.history["aborted"] == {"signal": "Ctrl-C", "resume_step": 0}
    assert "a rerun resumes from the start" in capsys.readouterr().out
    hook.close(run)
    run.ckpt.close()


def test_strong_recipe_differs_only_where_it_says_and_trains(fashion_dir, tmp_path):
    base = load_config(CONFIG)
    strong = load_config(CONFIG.with_name("vit_fashion_mnist_strong.py"))
    changed = {k for k in base.keys() if base[k] != strong[k]}
    assert changed == {
        "epochs",
        "optimizer",
        "learning_rate",
        "weight_decay",
        "schedule",
        "warmup_epochs",
        "grad_clip_norm",
        "label_smoothing",
        "augment_pad",
        "augment_flip",
    }
    apply_overrides(
        strong,
        [*SMALL_MODEL, f"data_dir={fashion_dir}", "epochs=2", "progress=False", "batch_size=40"],
    )
    out = vit.train_and_evaluate(strong, tmp_path / "run")
    assert out["status"] == "done" and out["final"]["test_count"] == 40


def test_augment_shifts_and_flips_without_changing_content():
    images = jnp.zeros((64, 28, 28, 1)).at[:, 10:18, 10:14].set(1.0)
    out = vit.augment(jax.random.key(0), images, pad=2, flip=True)
    assert out.shape == images.shape
    # Shifts of at most 2 pixels keep the whole blob; it is never cut.
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), images.sum(axis=(1, 2, 3)))
    assert len({np.asarray(o).tobytes() for o in out}) > 5  # really random per example
    np.testing.assert_array_equal(vit.augment(jax.random.key(0), images, 0, False), images)


@pytest.mark.slow
@pytest.mark.parametrize("merged", [False, True], ids=["direct", "merged"])
def test_bfloat16_compute_still_learns_with_float32_params(fashion_dir, tmp_path, merged):
    config = small_config(
        fashion_dir, "epochs=16", "model.dtype=bfloat16", f"model.merged_attention={merged}"
    )  # both attention forms; 92.5 % from epoch 15 on in either (Zen 4)
    out = vit.train_and_evaluate(config, tmp_path / "run")
    assert out["final"]["test_accuracy"] >= 0.9
    train, test = vit.load_data(config)
    task = vit.ViTTask(config, train, test)
    params = loop.latest_params(task, config, tmp_path / "run")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    # The compute really is bf16: the logits differ from the float32 model's.
    batch = task.eval_batches("test")[0]
    f32 = vit.ViTTask(small_config(fashion_dir, f"model.merged_attention={merged}"), train, test)
    assert not np.allclose(
        task.apply(params, batch, train=False, rng=None),
        f32.apply(params, batch, train=False, rng=None),
        atol=1e-6,
    )


def test_resuming_with_another_recipe_is_refused_and_the_record_kept(fashion_dir, tmp_path):
    config = small_config(fashion_dir)
    (tmp_path / "checkpoints").mkdir()  # as after an interrupted run
    run_files.save_run_config(tmp_path, config)
    record = (tmp_path / "config.json").read_text()
    # Where and how to run may change on resume, and under a constant learning rate the
    # number of epochs (a longer run is then the same run); what to train may not.
    apply_overrides(config, ["progress=True", "devices=all", "eval_batch_size=8", "epochs=5"])
    run_files.save_run_config(tmp_path, config)
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 5
    apply_overrides(config, ["learning_rate=0.01", "model.dim=32"])
    with pytest.raises(
        run_files.RecipeChanged, match=r"\(learning_rate: 0.003 -> 0.01, model.dim: 16 -> 32\)"
    ):
        run_files.save_run_config(tmp_path, config)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["dim"] == 16
    # A schedule that depends on the number of epochs makes it part of the recipe.
    apply_overrides(config, ["learning_rate=3e-3", "model.dim=16", "schedule=warmup_cosine"])
    (tmp_path / "config.json").write_text(record.replace('"constant"', '"warmup_cosine"'))
    with pytest.raises(run_files.RecipeChanged, match=r"\(epochs: 3 -> 5\)"):
        run_files.save_run_config(tmp_path, config)
    # A key added to the schema since the run was saved is not a change of recipe.
    old = json.loads(record)
    del old["model"]["dim"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    apply_overrides(config, ["schedule=constant", "model.dim=64"])
    run_files.save_run_config(tmp_path, config)
    # Without a checkpoint there is nothing to resume: a new config is a new run.
    (tmp_path / "checkpoints").rmdir()
    apply_overrides(config, ["learning_rate=0.5"])
    run_files.save_run_config(tmp_path, config)
    assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 0.5


def test_unknown_model_dtype_names_the_choices(fashion_dir):
    config = small_config(fashion_dir, "model.dtype=bfloat61")
    train, test = vit.load_data(config)
    with pytest.raises(ValueError, match=r"model.dtype must be 'float32' or 'bfloat16'"):
        vit.ViTTask(config, train, test)


def test_merged_attention_override_takes_shell_booleans_and_rejects_others(fashion_dir):
    config = small_config(fashion_dir, "model.merged_attention=false")
    assert config.model.merged_attention is False  # not the (truthy) string "false"
    apply_overrides(config, ["model.merged_attention=True"])
    assert config.model.merged_attention is True
    config = small_config(fashion_dir, "model.merged_attention=yes")  # None takes any type
    train, test = vit.load_data(config)
    with pytest.raises(ValueError, match=r"model.merged_attention must be None"):
        vit.ViTTask(config, train, test)


def test_the_progress_bar_of_a_resumed_epoch_starts_where_it_stopped(monkeypatch):
    """Resumed at step 7 with 5 steps an epoch: epoch 2's bar stands at 2 of 5; after a step it
    shows the last step's mean loss and the epoch's rate so far. Disabled, it shows nothing."""
    monkeypatch.setattr(hooks.time, "perf_counter", lambda: 12.0)
    run = types.SimpleNamespace(
        step=7, epoch=2, steps_per_epoch=5, config=types.SimpleNamespace(epochs=3), unit="images"
    )
    progress = hooks.Progress(enabled=True)
    progress.start_epoch(run)
    assert (progress.bar.n, progress.bar.total, progress.bar.desc) == (2, 5, "epoch 2/3")
    assert not progress.bar.disable
    run.read, run.seen, run.epoch_start = [{"loss_sum": 6.0, "count": 8.0}], 120.0, 10.0
    progress.after_step(run)
    assert progress.bar.n == 3 and progress.bar.postfix == "images/s=60, loss=0.7500"
    progress.close(run)
    assert progress.bar is None
    # No bar where progress is off, nor in a process other than the first of several.
    for enabled, main in ((False, True), (True, False)):
        monkeypatch.setattr(hooks, "is_main_process", lambda main=main: main)
        quiet = hooks.Progress(enabled=enabled)
        quiet.start_epoch(run)
        assert quiet.bar.disable
        quiet.close(run)


def test_the_epoch_line_reports_the_epochs_record(capsys):
    """One line per finished epoch: its losses, the evaluated split's accuracy in per cent, its
    time and rate, and a mark when it is the best so far."""
    record = {
        "train_loss": 0.31234,
        "valid_loss": 0.40517,
        "valid_accuracy": 0.88731,
        "train_time_s": 52.4,
        "images_per_s": 1146.2,
    }
    for best, mark in ((True, "  *best"), (False, "")):
        run = types.SimpleNamespace(
            epoch=3, config=types.SimpleNamespace(epochs=15, eval_split="valid"), unit="images"
        )
        run.new_best = best
        hooks.Progress(enabled=False).after_epoch(run, record)
        assert capsys.readouterr().out == (
            "epoch   3/15  train loss 0.3123  valid loss 0.4052  valid acc 88.73%  "
            f"(52 s, 1,146 images/s){mark}\n"
        )


def test_a_checkpoint_is_due_every_so_many_minutes_between_epoch_ends(monkeypatch):
    """Every half minute by the clock, not at an epoch's end (which saves anyway); every 0
    minutes is never."""
    clock = [0.0]
    monkeypatch.setattr(hooks.time, "monotonic", lambda: clock[0])
    run = types.SimpleNamespace(step=5, epoch_done=False)
    half_minute, never = hooks.Checkpoint(every_minutes=0.5), hooks.Checkpoint(every_minutes=0)
    for hook in (half_minute, never):
        hook.every.last_time = 0.0
    for seconds, due in ((29.9, False), (30.0, True), (600.0, True)):
        clock[0] = seconds
        assert half_minute.wants_read(run) is due and half_minute.due is due
        assert not never.wants_read(run)
    run.epoch_done = True
    assert not half_minute.wants_read(run)


def test_evaluation_makes_its_step_once_for_all_epochs(monkeypatch):
    """The evaluation step is made (and so compiled) once per run, not once per epoch; each
    epoch's record gets the split's loss and accuracy."""
    made, used = [], []
    monkeypatch.setattr(steps, "make_eval_step", lambda task: made.append(task) or len(made))
    monkeypatch.setattr(
        steps,
        "evaluate",
        lambda task, params, split, step, parallel: (
            used.append(step) or {"loss": 0.5, "accuracy": 0.25}
        ),
    )
    run = types.SimpleNamespace(
        task="task", state=types.SimpleNamespace(params=None), parallel=None
    )
    run.config = types.SimpleNamespace(eval_split="valid")
    evaluate = hooks.Evaluate()
    for _ in range(3):
        record = {}
        evaluate.after_epoch(run, record)
        assert record == {"valid_loss": 0.5, "valid_accuracy": 0.25}
    assert made == ["task"] and used == [1, 1, 1]


def test_the_train_loss_is_logged_every_log_step_and_at_each_epochs_end(capsys):
    """Every 2 steps, 3 steps an epoch: the mean loss since the last entry goes into the
    history and TensorBoard's scalars at step 2 and at the epoch's end (step 3); a line is
    printed at step 2 only, and only with print_lines (the progress bar's runs)."""
    for print_lines in (True, False):
        hook = hooks.TrainLoss(every_steps=2, print_lines=print_lines)
        run = types.SimpleNamespace(
            epoch=1, window={"loss_sum": 0.0, "count": 0.0}, history={"train": []}, scalars={}
        )
        for step, loss in zip((1, 2, 3), (1.0, 2.0, 4.0), strict=True):
            run.step, run.epoch_done = step, step == 3
            run.window = {
                "loss_sum": run.window["loss_sum"] + 8 * loss,
                "count": run.window["count"] + 8,
            }
            hook.after_step(run)
        assert run.history["train"] == [
            {"step": 2, "epoch": 1, "loss": 1.5, "examples": 16.0},
            {"step": 3, "epoch": 1, "loss": 4.0, "examples": 8.0},
        ]
        assert run.scalars == {"train/loss": 4.0}
        printed = "step      2  epoch 1  train loss 1.5000\n" if print_lines else ""
        assert capsys.readouterr().out == printed


def test_curves_are_redrawn_when_due_after_the_last_epoch_and_on_a_stop(monkeypatch, tmp_path):
    """Epochs of 8 s with a 20 s period: drawn after epochs 1, 4 (24 s on) and 5 (the last),
    and after a stop, whatever the clock says; not before an epoch has ended, nor by a
    process other than the first."""
    clock, drawn = [0.0], []
    monkeypatch.setattr(hooks.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(plots, "plot_history", lambda history, split, path: drawn.append(clock[0]))
    run = types.SimpleNamespace(
        history={"epochs": []}, config=types.SimpleNamespace(epochs=5, eval_split="test")
    )
    run.workdir = tmp_path
    curves = hooks.Curves(every_seconds=20.0)
    for epoch in range(1, 6):
        clock[0] = 8.0 * epoch
        run.history["epochs"].append({"epoch": epoch})
        curves.after_epoch(run, {"epoch": epoch})
    assert drawn == [8.0, 32.0, 40.0]
    clock[0] = 41.0
    curves.stop(run)
    assert drawn[-1] == 41.0
    # Nothing to draw before the first epoch ends; nothing drawn by a process but the first.
    hooks.Curves().stop(types.SimpleNamespace(history={"epochs": []}))
    monkeypatch.setattr(hooks, "is_main_process", lambda: False)
    curves.stop(run)
    assert drawn == [8.0, 32.0, 40.0, 41.0]


def test_the_metric_writer_leaves_torch_unloaded_and_importable(tmp_path):
    """tensorboardX would import torch (~2 s per process) to recognise its tensors: the writer
    keeps it out, writes readable scalars, and torch still imports afterwards."""
    import subprocess
    import sys

    code = (
        "import sys; from hw2jax.train import metrics\n"
        f"w = metrics.MetricWriter({str(tmp_path)!r}); w.scalars(3, {{'a/b': 0.5}}); w.close()\n"
        "loaded = 'torch' in sys.modules\n"
        "import torch\n"
        f"print(loaded, metrics.read_scalars({str(tmp_path / 'tensorboard')!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False {'a/b': [(3, 0.5)]}"


def test_metrics_stream_to_tensorboard_and_curves_follow_each_epoch(fashion_dir, tmp_path):
    """Every logged train loss and every epoch's evaluation reach the TensorBoard event files
    with the values and steps of history.json; curves.png exists after the first epoch."""
    from hw2jax.train import metrics

    class CurvesAfterFirstEpoch(vit.ViTTask):
        def train_batches(self, epoch):
            if epoch == 1:  # the loop has finished epoch 1 and redrawn the curves
                seen.append((tmp_path / "run" / "curves.png").exists())
            return super().train_batches(epoch)

    seen = []
    config = small_config(fashion_dir, "epochs=2")
    train, test = vit.load_data(config)
    history = loop.train_and_evaluate(
        CurvesAfterFirstEpoch(config, train, test), config, tmp_path / "run"
    )
    assert seen == [True]
    scalars = metrics.read_scalars(tmp_path / "run" / "tensorboard")

    def same(tag, rows, key):
        assert [step for step, _ in scalars[tag]] == [r["step"] for r in rows]
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in rows], rel=1e-6)

    same("train/loss", history["train"], "loss")
    same("test/accuracy", history["epochs"], "test_accuracy")
    same("test/loss", history["epochs"], "test_loss")
    assert len(scalars["train/images_per_s"]) == 2


def test_random_erase_covers_one_rectangle_of_the_stated_size_or_nothing():
    images = jnp.full((256, 28, 28, 1), -1.0)  # outside the noise's range: every erased pixel shows
    assert bool(jnp.all(vit.random_erase(jax.random.key(0), images, 0.0) == images))
    out = np.asarray(vit.random_erase(jax.random.key(1), images, 1.0))[..., 0]
    edges = []
    for changed in out != -1.0:
        rows, cols = np.nonzero(changed.any(1))[0], np.nonzero(changed.any(0))[0]
        box = changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert box.all()  # one solid rectangle
        assert 0.02 * 784 * 0.5 <= changed.sum() <= 0.25 * 784 * 1.6  # rounding of the sides
        edges.append((rows[0], cols[0], rows[-1], cols[-1]))
    top, left, bottom, right = np.array(edges).T
    # Anywhere in the image: from the first row and column to the last, at many offsets.
    assert top.min() == left.min() == 0 and bottom.max() == right.max() == 27
    assert len(set(top)) > 15 and len(set(left)) > 15
    assert out[out != -1.0].min() >= 0 and out[out != -1.0].max() <= 255
    half = np.asarray(vit.random_erase(jax.random.key(2), images, 0.5))
    assert 0.35 < np.mean((half != -1.0).any((1, 2, 3))) < 0.65


def test_valid_split_is_held_out_of_training_and_picks_the_best_epoch(fashion_dir, tmp_path):
    config = small_config(
        fashion_dir, "valid_size=30", "eval_split=valid", "best_metric=valid_accuracy", "epochs=2"
    )
    train, test = vit.load_data(config)
    task = vit.ViTTask(config, train, test)
    held = {tuple(np.asarray(x).ravel()) for x in task.splits["valid"]["image"]}
    kept = {tuple(np.asarray(x).ravel()) for x in task.splits["train"]["image"]}
    assert len(held) == 30 and len(kept) == 66 and not held & kept
    out = vit.train_and_evaluate(config, tmp_path / "run")
    assert [sorted(k for k in r if "valid" in k) for r in out["epochs"]] == [
        ["valid_accuracy", "valid_loss"]
    ] * 2
    assert out["final"]["test_count"] == 40  # test read once, at the end
    with pytest.raises(ValueError, match="set valid_size"):
        vit.check(small_config(fashion_dir, "eval_split=valid", "best_metric=valid_accuracy"))


def test_init_times_no_path(fashion_dir, monkeypatch):
    """The model's init runs on a batch of one, a shape class that training never meets: auto
    takes the feature rule there instead of spending the probe's budget timing it. Every caller
    of the init (the loop, eval, predict, benchmarks) shares it."""
    monkeypatch.setenv(dispatch.AUTO_ENV, "measure")
    timed = []
    monkeypatch.setattr(dispatch, "fastest", lambda op, *a, **k: timed.append(op))
    config = small_config(fashion_dir)
    task = vit.ViTTask(config, *vit.load_data(config))
    task.init_params(jax.random.key(0))
    assert timed == []
    # The same model applied to a batch outside init is timed (auto measures there).
    task.model.apply({"params": task.init_params(jax.random.key(0))}, jnp.zeros((2, 28, 28, 1)))
    assert timed and set(timed) <= {"softmax", "linear", "layer_norm"}
