"""One training loop for every experiment: it runs the jit-compiled steps epoch by epoch and
calls its hooks (:mod:`hw2jax.train.hooks`) for everything else: reading metrics back,
divergence, signals, logs, progress, evaluation, checkpoints, TensorBoard and curves.

An experiment plugs in through :class:`hw2jax.train.steps.Task`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
from tqdm.auto import tqdm

from hw2jax.attention import dispatch
from hw2jax.cpu import machine
from hw2jax.train import checkpoints, hooks, steps
from hw2jax.train.run_files import load_history
from hw2jax.train.sharding import DataParallel, peer_lost


def train_and_evaluate(
    task: steps.Task,
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    extra_hooks: Sequence[hooks.Hook] = (),
) -> dict[str, Any]:
    """Trains ``task`` for ``config.epochs``, evaluating ``config.eval_split`` each epoch.

    Resumes from ``workdir`` if it holds a checkpoint; resuming is bitwise the same as not
    stopping. Returns the history dict; its ``status`` is ``"done"`` (every epoch finished) or
    ``"interrupted"`` (a signal, or a hook that set ``run.stop_requested``); ``history.json``
    also says ``"running"`` while it runs, ``"diverged"`` or ``"failed: <reason>"``.
    ``extra_hooks`` act after the default ones (:func:`hooks.default_hooks`).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    steps_per_epoch = len(task.train_batches(0))
    tx = steps.build_optimizer(config, steps_per_epoch, _learning_rate_scale(task))
    state = steps.TrainState.create(
        task.init_params(init_rng), tx, getattr(task, "frozen_keys", ())
    )
    counts = steps.parameter_counts(state)
    tqdm.write(f"parameters: {counts['total']:,} total, {counts['trainable']:,} trainable")
    ckpt = checkpoints.Checkpoints(workdir / "checkpoints")
    state = ckpt.restore_latest(state)
    start_step = int(state.step)
    parallel = DataParallel(config.devices, config.batch_size, config.eval_batch_size)
    history = load_history(workdir, start_step, ckpt.best_metrics())
    history |= {"config": config.to_dict(), "parameters": counts, "unit": task.unit}
    history["machines"], here = with_this_machine(history.get("machines", []))
    if start_step:
        tqdm.write(f"Resuming from step {start_step} in {workdir}.")
    run = hooks.Run(
        task=task,
        config=config,
        workdir=workdir,
        state=parallel.replicate(state),
        history=history,
        ckpt=ckpt,
        parallel=parallel,
        steps_per_epoch=steps_per_epoch,
        step=start_step,
        window=history.pop("window", None) or {"loss_sum": 0.0, "count": 0.0},
        machine=here,
    )
    everything = [*hooks.default_hooks(config), *extra_hooks]
    run.save_history()
    # closing: the asynchronous checkpoint writes finish before anything reads the work dir,
    # and a write that fails then is recorded too.
    with (
        _failure_recorded(run),
        _closed(ckpt),
        _hooks_closed(everything, run),
        dispatch.recording() as run.auto_paths,
    ):
        for hook in everything:
            hook.start(run)
        _train(run, everything, steps.make_train_step(task, step_rng))
    return run.history


def _train(run: hooks.Run, everything: list[hooks.Hook], train_step) -> None:
    config, spe = run.config, run.steps_per_epoch
    for epoch in range(run.step // spe + 1, config.epochs + 1):
        run.epoch, run.seen, run.epoch_start = epoch, 0.0, time.perf_counter()
        run.epoch_first_step = run.step
        batches = run.task.train_batches(epoch - 1)
        for hook in everything:
            hook.start_epoch(run)
        for i in range(run.step - (epoch - 1) * spe, spe):
            run.state, sums = train_step(run.state, run.parallel.shard_batch(batches[i]))
            run.pending.append(sums)
            run.step += 1
            run.read, run.scalars = [], {}
            stopping = run.stop_requested is not None  # a signal after this stops the next step
            if any([hook.wants_read(run) for hook in everything]) or stopping:  # ask each one
                run.read_back()
            for hook in everything:
                hook.after_step(run)
            if stopping and not run.epoch_done:  # at an epoch's end, evaluate first
                return _stop(run, everything)
        train_time = time.perf_counter() - run.epoch_start
        record = {
            "epoch": epoch,
            "step": run.step,
            "train_loss": _epoch_mean_loss(run.history["train"], epoch),
            "train_time_s": train_time,
            f"{run.unit}_per_s": run.seen / train_time,
        }
        if run.epoch_first_step > (epoch - 1) * spe:  # resumed mid-epoch: timed from there on
            record["timed_from_step"] = run.epoch_first_step
        run.history["epochs"].append(record)
        run.new_best = False
        for hook in everything:
            hook.after_epoch(run, record)
        run.save_history()
        if run.stop_requested and epoch < config.epochs:
            return _stop(run, everything)
    run.status = "done"  # every epoch finished (also when there was none left to run)
    run.save_history()


def _stop(run: hooks.Run, everything: list[hooks.Hook]) -> None:
    run.status = "interrupted"
    for hook in everything:
        hook.stop(run)
    run.save_history()
    run.history["stopped_by"] = run.stop_requested  # for the exit code


def with_this_machine(machines: list[dict]) -> tuple[list[dict], int]:
    """Every machine that trained this run (a resumed run may have moved), each once, with the
    date it first did, the cores it could use, the settings that change its paths or numbers
    (a kernel build target, a forced path, XLA's flags: ``env``) and the code's commit (a run
    resumed after a change of code gets an entry of its own), so that two runs can be told
    apart; and which of them is this one."""
    here = machine()
    same = ("cpu_model", "cpu_family_model", "cpu_count", "usable_cores", "cpu_features")
    same += ("jax", "jaxlib", "env", "commit")
    # A record from before usable_cores was kept: the process had the machine's cores then.
    seen = [{"usable_cores": m.get("cpu_count"), **m} for m in machines]
    for index, m in enumerate(seen):
        if all(m.get(k) == here[k] for k in same):
            return machines, index
    return [*machines, here], len(machines)


def _learning_rate_scale(task: steps.Task):
    return getattr(task, "learning_rate_scale", None)  # optional: per-parameter learning rates


def _epoch_mean_loss(records: list[dict], epoch: int) -> float:
    rows = [r for r in records if r["epoch"] == epoch]
    return sum(r["loss"] * r["examples"] for r in rows) / max(sum(r["examples"] for r in rows), 1)


@contextlib.contextmanager
def _closed(ckpt: checkpoints.Checkpoints):
    """Closes the checkpoints after the block; after an exception, an error on closing (the
    same failed write, reported again) does not hide the first one."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            ckpt.close()
        raise
    ckpt.close()


@contextlib.contextmanager
def _hooks_closed(everything: list[hooks.Hook], run: hooks.Run):
    try:
        yield
    finally:
        for hook in everything:
            hook.close(run)


@contextlib.contextmanager
def _failure_recorded(run: hooks.Run):
    """An exception that ends the run is written to history.json as ``failed: <reason>``
    (unless a hook already wrote a more precise status, such as ``diverged``). A checkpoint
    that could not be written is listed under ``failed_saves``, and the epochs after the
    newest checkpoint on disk are dropped: a rerun trains them again."""
    try:
        yield
    except BaseException as e:
        lost = peer_lost(e, run.step)
        if lost is not None:  # not a disk problem, nor a bug: a process of this run is gone
            run.status = f"failed: PeerLost: {lost}"[:300]
            run.save_history()
            raise lost from e
        if isinstance(e, checkpoints.CheckpointWriteError):
            resume = e.resume_step or 0
            run.history["epochs"] = [r for r in run.history["epochs"] if r["step"] <= resume]
            run.history["train"] = [r for r in run.history["train"] if r["step"] <= resume]
            run.history.pop("window", None)
            failed = {"step": e.step, "reason": e.reason, "resume_step": resume}
            run.history.setdefault("failed_saves", []).append(failed)
        if run.status == "running":
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            run.status = f"failed: {type(e).__name__}: {reason}"[:300]
        run.save_history()
        raise


def test_withheld(config: ml_collections.ConfigDict) -> bool:
    """True, after saying so, when ``config.read_test`` is False: recipes are compared on valid,
    and test is read once, by the chosen recipe's command run again."""
    if config.read_test:
        return False
    print(
        "test set not read (read_test=False): compare runs on valid, then run the chosen "
        "one's command again with --set read_test=True to read it once"
    )
    return True


def latest_params(task: steps.Task, config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    """Params of the latest checkpoint in ``workdir`` (the final model of a finished run)."""
    ckpt = checkpoints.Checkpoints(Path(workdir) / "checkpoints")
    # Shapes only: the checkpoint supplies every value.
    state = jax.eval_shape(
        lambda: steps.TrainState.create(
            task.init_params(jax.random.key(0)),
            steps.build_optimizer(config, 1, _learning_rate_scale(task)),
            getattr(task, "frozen_keys", ()),
        )
    )
    with contextlib.closing(ckpt):
        return ckpt.restore_latest(state).params
