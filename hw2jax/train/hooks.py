"""What happens around the training steps, one hook per concern: reading the step metrics back,
stopping on divergence or on a signal, the train-loss log, progress, checkpoints, evaluation,
TensorBoard scalars and curves.

A hook is an object with some of the methods of :class:`Hook`; the loop calls them in list
order and passes the :class:`Run` they share. Like clu's periodic actions, a hook keeps its own
state in attributes and decides itself whether it is due (:class:`Every`). A researcher's hook
(an extra metric, an early stop) goes in the ``hooks`` list of ``loop.train_and_evaluate``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from hw2jax.errors import Hw2jaxError
from hw2jax.train import checkpoints, plots, steps
from hw2jax.train.metrics import MetricWriter
from hw2jax.train.report import timing
from hw2jax.train.run_files import write_json_atomic
from hw2jax.train.sharding import DataParallel, is_main_process


class TrainingDiverged(Hw2jaxError, RuntimeError):
    """The loss became NaN or inf; the message names the checkpoint kept and the fixes."""


@dataclasses.dataclass(eq=False)
class Run:
    """What the loop and its hooks share while one run trains."""

    task: steps.Task
    config: ml_collections.ConfigDict
    workdir: Path
    state: steps.TrainState
    history: dict[str, Any]
    ckpt: checkpoints.Checkpoints
    parallel: DataParallel
    steps_per_epoch: int
    step: int = 0  # steps done
    epoch: int = 0  # the epoch running, from 1
    status: str = "running"  # then done, interrupted, diverged or failed: <reason>
    stop_requested: str | None = None  # what asked the run to stop (a signal's name)
    window: dict[str, float] = dataclasses.field(default_factory=dict)  # loss since the log
    seen: float = 0.0  # examples read back this epoch
    epoch_start: float = 0.0  # time.perf_counter() at the epoch's first step in this process
    epoch_first_step: int = 0  # the step this process began the epoch from (later on a resume)
    pending: list = dataclasses.field(default_factory=list)  # step sums still on the device
    read: list = dataclasses.field(default_factory=list)  # sums read back at this step
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)  # for TensorBoard
    new_best: bool = False  # the epoch just ended is the best so far
    confirming_save: bool = False  # waiting for a checkpoint write: a signal must not cut it
    machine: int = -1  # this machine's entry in history["machines"]
    # The shape classes auto decided by timings in this process, and what it took
    # (dispatch.recording): kept in this machine's entry.
    auto_paths: dict[str, dict] = dataclasses.field(default_factory=dict)

    @property
    def unit(self) -> str:
        return self.task.unit

    @property
    def epoch_done(self) -> bool:
        return self.step == self.epoch * self.steps_per_epoch

    def read_back(self) -> None:
        """Reads the pending step sums (waiting for their steps) into ``read`` and the window."""
        self.read = jax.device_get(self.pending)
        self.pending = []
        for sums in self.read:
            self.window = {k: self.window[k] + float(sums[k]) for k in ("loss_sum", "count")}
            self.seen += float(sums["count"])

    def save_history(self) -> None:
        self.history["status"] = self.status
        if self.auto_paths:
            entry = self.history["machines"][self.machine]
            entry["auto_paths"] = {**entry.get("auto_paths", {}), **self.auto_paths}
        write_json_atomic(self.workdir / "history.json", self.history)

    def save_latest(self, *, wait: bool = False) -> None:
        """The state and the history with the loss since the last log line, so that resuming
        from this step is bitwise the same as not stopping."""
        self.history["window"] = {**self.window, "step": self.step}
        self.ckpt.save_latest(self.state)
        if wait:
            self.confirm_saves()
        self.save_history()
        del self.history["window"]

    def confirm_saves(self) -> None:
        """Waits until every checkpoint started is on disk; a signal meanwhile waits too."""
        self.confirming_save = True
        try:
            self.ckpt.wait(self.step)
        finally:
            self.confirming_save = False


class Hook:
    """Every method is optional; the loop calls what a hook defines."""

    def start(self, run: Run) -> None: ...
    def start_epoch(self, run: Run) -> None: ...
    def wants_read(self, run: Run) -> bool:  # must this step's sums be read back now?
        return False

    def after_step(self, run: Run) -> None: ...
    def after_epoch(self, run: Run, record: dict[str, Any]) -> None: ...
    def stop(self, run: Run) -> None: ...  # the run stops early (signal); state is saved after
    def close(self, run: Run) -> None: ...  # always, last, also after an exception


@dataclasses.dataclass
class Every:
    """Due every ``steps`` steps and/or ``seconds`` seconds (0: never by that measure)."""

    steps: int = 0
    seconds: float = 0.0
    last_time: float = dataclasses.field(default_factory=time.monotonic)

    def due(self, step: int) -> bool:
        by_steps = bool(self.steps) and step % self.steps == 0
        by_time = bool(self.seconds) and time.monotonic() - self.last_time >= self.seconds
        return by_steps or by_time


class CheckFinite(Hook):
    """Stops with :class:`TrainingDiverged` at the first NaN or inf loss. Step sums are read
    every ``every_steps`` steps, not after each: a read waits for the step to finish, which
    leaves a GPU idle while Python queues the next one."""

    def __init__(self, every_steps: int = 10):
        self.every = Every(steps=every_steps)

    def wants_read(self, run: Run) -> bool:
        return self.every.due(run.step)

    def after_step(self, run: Run) -> None:
        for j, sums in enumerate(run.read):
            if not np.isfinite(sums["loss_sum"]):
                run.status = "diverged"
                run.save_history()
                raise TrainingDiverged(
                    f"loss is {sums['loss_sum']} at step {run.step - len(run.read) + j + 1} "
                    f"(epoch {run.epoch}). The last good checkpoint (step "
                    f"{run.ckpt.latest_step()}) is kept in {run.ckpt.directory}. Lower the "
                    "learning rate or add grad_clip_norm."
                )


class StopOnSignal(Hook):
    """The first Ctrl-C (SIGINT) or SIGTERM (SLURM preemption, ``timeout``, ``kill``) asks the
    run to save and stop after the next step ends. A second one during a checkpoint write
    waits for the write; at any other time it ends the process at once, saying which step a
    rerun resumes from, with the first signal's exit code (130, or 143 for SIGTERM). It ends
    the process without unwinding the stack: an exception raised while jax traces or compiles
    crashed the interpreter (exit 139). Any hook may ask for a stop by setting
    ``run.stop_requested``."""

    SIGNALS: ClassVar[dict[int, str]] = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self):
        self.previous: dict[int, Any] = {}
        self.run: Run | None = None

    def handle(self, signum: int, frame: Any) -> None:
        run, name = self.run, self.SIGNALS[signum]
        if run.stop_requested is None:
            run.stop_requested = name
            tqdm.write(f"{name}: saving a checkpoint after this step (send it again to abort).")
        elif run.confirming_save:
            tqdm.write(
                f"{name}: a checkpoint is being written; waiting for it to finish "
                "(kill -9 abandons it)."
            )
        else:
            # The first signal's exit code; a stop a hook asked for has none: this one's.
            first = {n: s for s, n in self.SIGNALS.items()}.get(run.stop_requested, signum)
            self.abort(name, 128 + first)

    def abort(self, name: str, code: int) -> None:
        """Ends the process now; history.json says so and which step a rerun resumes from."""
        run = self.run
        resume = run.ckpt.committed_step()
        run.status = "interrupted"
        run.history["stopped_by"] = run.stop_requested or name
        run.history["aborted"] = {"signal": name, "resume_step": resume or 0}
        run.save_history()
        where = f"step {resume}" if resume is not None else "the start"
        tqdm.write(f"{name} again: stopped at once, without saving; a rerun resumes from {where}.")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def start(self, run: Run) -> None:
        self.run = run
        for signum in self.SIGNALS:
            try:
                self.previous[signum] = signal.signal(signum, self.handle)
            except ValueError:  # not in the main thread
                pass

    def close(self, run: Run) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous = {}


class TrainLoss(Hook):
    """The mean train loss since the last line, every ``every_steps`` steps and at each
    epoch's end: into the history, TensorBoard and (``print_lines``) the output."""

    def __init__(self, every_steps: int, print_lines: bool = True):
        self.every = Every(steps=every_steps)
        self.print_lines = print_lines

    def wants_read(self, run: Run) -> bool:
        return self.every.due(run.step) or run.epoch_done

    def after_step(self, run: Run) -> None:
        if not self.wants_read(run):
            return
        n = run.window["count"]
        loss = run.window["loss_sum"] / max(n, 1.0)
        row = {"step": run.step, "epoch": run.epoch, "loss": loss, "examples": n}
        run.history["train"].append(row)
        run.scalars["train/loss"] = loss
        run.window = {"loss_sum": 0.0, "count": 0.0}
        if self.every.due(run.step) and self.print_lines:
            tqdm.write(f"step {run.step:6d}  epoch {run.epoch}  train loss {loss:.4f}")


class Progress(Hook):
    """A progress bar per epoch (loss and throughput) and one line per finished epoch."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and is_main_process()
        self.bar = None

    def start_epoch(self, run: Run) -> None:
        done = run.step - (run.epoch - 1) * run.steps_per_epoch
        self.bar = tqdm(
            desc=f"epoch {run.epoch}/{run.config.epochs}",
            initial=done,
            total=run.steps_per_epoch,
            disable=not self.enabled,
            leave=False,
        )

    def after_step(self, run: Run) -> None:
        self.bar.update(1)
        if run.read:
            last = run.read[-1]
            rate = run.seen / (time.perf_counter() - run.epoch_start)
            self.bar.set_postfix(
                loss=f"{last['loss_sum'] / max(last['count'], 1):.4f}",
                **{f"{run.unit}/s": f"{rate:.0f}"},
            )

    def after_epoch(self, run: Run, record: dict[str, Any]) -> None:
        self.close(run)
        split = run.config.eval_split
        tqdm.write(
            f"epoch {run.epoch:3d}/{run.config.epochs}  train loss {record['train_loss']:.4f}  "
            f"{split} loss {record[f'{split}_loss']:.4f}  "
            f"{split} acc {100 * record[f'{split}_accuracy']:.2f}%  ({timing(record, run.unit)})"
            + ("  *best" if run.new_best else "")
        )

    def close(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Evaluate(Hook):
    """Loss and accuracy on ``config.eval_split`` after every epoch, into the epoch's record."""

    def __init__(self):
        self.eval_step = None

    def after_epoch(self, run: Run, record: dict[str, Any]) -> None:
        self.eval_step = self.eval_step or steps.make_eval_step(run.task)
        split = run.config.eval_split
        metrics = steps.evaluate(run.task, run.state.params, split, self.eval_step, run.parallel)
        record[f"{split}_loss"] = metrics["loss"]
        record[f"{split}_accuracy"] = metrics["accuracy"]


class Checkpoint(Hook):
    """The latest state at every epoch's end and every ``every_minutes`` between (0: epoch
    ends only), so a kill -9 costs at most that much work; the best epoch by
    ``config.best_metric``; and the state when the run stops early."""

    def __init__(self, every_minutes: float):
        self.every = Every(seconds=60 * every_minutes)
        self.best = -math.inf
        self.due = False  # asked once per step, in wants_read: the clock moves between calls

    def start(self, run: Run) -> None:
        metric = run.config.best_metric
        saved = (run.ckpt.best_metrics() or {}).get(metric, -math.inf)  # if the history is lost
        self.best = max([saved] + [r[metric] for r in run.history["epochs"]])

    def wants_read(self, run: Run) -> bool:  # a save includes the loss since the last log
        self.due = not run.epoch_done and self.every.due(run.step)
        return self.due

    def after_step(self, run: Run) -> None:
        if run.stop_requested is None and self.due:
            run.save_latest()
            self.every.last_time = time.monotonic()

    def after_epoch(self, run: Run, record: dict[str, Any]) -> None:
        value = record[run.config.best_metric]
        run.new_best = value > self.best
        self.best = max(self.best, value)
        run.ckpt.save_latest(run.state)
        if run.new_best:
            run.ckpt.save_best(run.state, record)
        # Confirmed before the history lists the epoch: the evaluation took longer anyway.
        run.confirm_saves()
        self.every.last_time = time.monotonic()
        run.save_history()

    def stop(self, run: Run) -> None:
        run.save_latest(wait=True)
        tqdm.write(
            f"Stopped at step {run.step} ({run.stop_requested}); checkpoint saved in "
            f"{run.ckpt.directory}. Run the same command again to resume."
        )


class WriteMetrics(Hook):
    """Scalars to TensorBoard event files in ``<workdir>/tensorboard`` as they come."""

    def __init__(self):
        self.writer = None

    def start(self, run: Run) -> None:
        self.writer = MetricWriter(run.workdir)

    def after_step(self, run: Run) -> None:
        if run.scalars:
            self.writer.scalars(run.step, run.scalars)

    def after_epoch(self, run: Run, record: dict[str, Any]) -> None:
        split, unit = run.config.eval_split, run.unit
        values = {
            "train/epoch_loss": record["train_loss"],
            f"{split}/loss": record[f"{split}_loss"],
            f"{split}/accuracy": record[f"{split}_accuracy"],
            f"train/{unit}_per_s": record[f"{unit}_per_s"],
        }
        self.writer.scalars(record["step"], values)
        self.writer.flush()

    def close(self, run: Run) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Curves(Hook):
    """``curves.png``, redrawn after an epoch once ``every_seconds`` have passed since the last
    drawing, after the last epoch, and when the run stops early (with the train losses of the
    unfinished epoch). A drawing takes about 0.3 s: runs of many short epochs skip some."""

    def __init__(self, every_seconds: float = 20.0):
        self.every_seconds = every_seconds
        self.drawn_at: float | None = None  # time.monotonic() of the last drawing

    def draw(self, run: Run) -> None:
        if run.history["epochs"] and is_main_process():
            plots.plot_history(run.history, run.config.eval_split, run.workdir / "curves.png")
            self.drawn_at = time.monotonic()

    def after_epoch(self, run: Run, record: dict[str, Any]) -> None:
        due = self.drawn_at is None or time.monotonic() - self.drawn_at >= self.every_seconds
        if due or record["epoch"] == run.config.epochs:
            self.draw(run)

    def stop(self, run: Run) -> None:
        self.draw(run)


def default_hooks(config: ml_collections.ConfigDict) -> list[Hook]:
    """The hooks every run has, in the order they act."""
    every_minutes = config.checkpoint_every_minutes
    if jax.process_count() > 1:  # processes must agree on every save: clocks do not
        every_minutes = 0.0
    return [
        CheckFinite(),
        StopOnSignal(),
        TrainLoss(config.log_every_steps, print_lines=config.progress),
        Evaluate(),
        Checkpoint(every_minutes),  # after Evaluate: it reads the record's best_metric
        WriteMetrics(),
        Curves(),
        Progress(config.progress),  # after Checkpoint: its epoch line marks a new best
    ]
