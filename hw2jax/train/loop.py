"""One training loop for every experiment: jit-compiled steps, progress, history, orbax
checkpoints (latest and best), resume from the work dir, clean Ctrl-C, divergence stop.

An experiment plugs in through :class:`Task`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from hw2jax.train import checkpoints, plots
from hw2jax.train.metrics import MetricWriter
from hw2jax.train.sharding import DataParallel, is_main_process

Batch = dict[str, jax.Array]
Params = Any


class Task(Protocol):
    """What an experiment gives the loop. Every batch carries a float ``mask`` of shape
    [batch] that is 0 for padding examples, so partial batches count exactly."""

    def init_params(self, rng: jax.Array) -> Params: ...

    def apply(self, params: Params, batch: Batch, *, train: bool, rng: jax.Array) -> jax.Array: ...

    def losses(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """Per-example (loss, correct), each [batch]."""
        ...

    def train_batches(self, epoch: int) -> Sequence[Batch]: ...

    def eval_batches(self, split: str) -> Sequence[Batch]: ...

    # Optional: ``unit``, what one example is called in the progress line (default "img").


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


class TrainState(struct.PyTreeNode):
    """Step, params and optimizer state. Top-level params named in ``frozen`` (a pretrained
    encoder) get no gradient, no update and no optimizer state."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    frozen: tuple[str, ...] = struct.field(pytree_node=False, default=())

    @classmethod
    def create(
        cls, params: Params, tx: optax.GradientTransformation, frozen: tuple[str, ...] = ()
    ) -> TrainState:
        trainable = {k: v for k, v in params.items() if k not in frozen}
        return cls(jnp.zeros((), jnp.int32), params, tx.init(trainable), tx, tuple(frozen))

    def trainable(self) -> Params:
        return {k: v for k, v in self.params.items() if k not in self.frozen}

    def apply_gradients(self, grads: Params) -> TrainState:
        """``grads`` covers the trainable params only."""
        trainable = self.trainable()
        updates, opt_state = self.tx.update(grads, self.opt_state, trainable)
        params = {**self.params, **optax.apply_updates(trainable, updates)}
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


# ------------------------------------------------------------------------------ steps


def _masked_sums(task: Task, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    loss, correct = task.losses(outputs, batch)
    mask = batch["mask"]
    return {
        "loss_sum": jnp.sum(loss * mask),
        "correct": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
    }


def make_train_step(task: Task, rng: jax.Array) -> Callable[[TrainState, Batch], tuple]:
    def train_step(state: TrainState, batch: Batch):
        step_rng = jax.random.fold_in(rng, state.step)

        def loss_fn(trainable):
            params = {**state.params, **trainable}
            outputs = task.apply(params, batch, train=True, rng=step_rng)
            sums = _masked_sums(task, outputs, batch)
            return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

        grads, sums = jax.grad(loss_fn, has_aux=True)(state.trainable())
        return state.apply_gradients(grads=grads), sums

    return jax.jit(train_step, donate_argnums=0, compiler_options=_compiler_options(task))


def make_eval_step(task: Task) -> Callable[[Params, Batch], dict[str, jax.Array]]:
    def eval_step(params, batch):
        outputs = task.apply(params, batch, train=False, rng=jax.random.key(0))
        return _masked_sums(task, outputs, batch)

    return jax.jit(eval_step, compiler_options=_compiler_options(task))


def _compiler_options(task: Task) -> dict[str, str] | None:
    """XLA options a task asks for its steps (``task.compiler_options``, optional)."""
    return getattr(task, "compiler_options", None) or None


def evaluate(
    task: Task, params: Params, split: str, eval_step=None, parallel: DataParallel | None = None
) -> dict[str, float]:
    eval_step = eval_step or make_eval_step(task)
    totals = None
    for batch in task.eval_batches(split):
        sums = eval_step(params, parallel.shard_batch(batch) if parallel else batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "loss": float(totals["loss_sum"]) / count,
        "accuracy": float(totals["correct"]) / count,
        "count": int(count),
    }


# --------------------------------------------------------------------------- optimizer


def build_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """``adam_l2``: torch.optim.Adam(weight_decay=wd), i.e. wd * param added to the gradient
    before Adam (coupled L2). ``adamw``: decoupled decay, with warm-up and cosine decay."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "warmup_cosine":
        warmup = int(config.warmup_epochs * steps_per_epoch)
        lr = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, max(warmup, 1), max(total, warmup + 1)
        )
    else:
        lr = config.learning_rate
    if config.optimizer == "adam_l2":
        tx = optax.chain(
            optax.add_decayed_weights(config.weight_decay),
            optax.scale_by_adam(eps=1e-8),
            optax.scale_by_learning_rate(lr),
        )
    elif config.optimizer == "adamw":
        # No decay on biases, norms and embeddings-of-one (vectors): the usual AdamW practice.
        mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
        tx = optax.adamw(lr, weight_decay=config.weight_decay, mask=mask)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; choose adam_l2 or adamw.")
    if config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx


def latest_params(task: Task, config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    """Params of the latest checkpoint in ``workdir`` (the final model of a finished run)."""
    ckpt = checkpoints.Checkpoints(Path(workdir) / "checkpoints")
    # Shapes only: the checkpoint supplies every value.
    state = jax.eval_shape(
        lambda: TrainState.create(
            task.init_params(jax.random.key(0)),
            build_optimizer(config, 1),
            getattr(task, "frozen_keys", ()),
        )
    )
    with contextlib.closing(ckpt):
        return ckpt.restore_latest(state).params


def parameter_counts(state: TrainState) -> dict[str, int]:
    """Scalars in all params, and in those the optimizer updates (frozen ones excluded)."""

    def size(tree) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

    return {"total": size(state.params), "trainable": size(state.trainable())}


# ----------------------------------------------------------------------------- history


def write_json_atomic(path: Path, data: Any) -> None:
    if not is_main_process():  # several processes share the work dir
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# Step metrics are read back (and checked for NaN) every this many steps, not after each step:
# a read waits for the step to finish, which leaves a GPU idle while Python queues the next one.
_READ_EVERY_STEPS = 10

# Keys that say where or how to run, not what to train: changing them on resume is expected.
_RESUME_NEUTRAL = {
    "progress",
    "data_dir",
    "data_source",
    "devices",
    "checkpoint_every_minutes",
    "read_test",
}


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def save_run_config(workdir: Path, config: ml_collections.ConfigDict) -> list[str]:
    """Writes ``workdir/config.json``, making the work dir if needed. When a checkpoint is
    there to resume from and the saved config trained something else (epochs, learning rate,
    model...), warns with the differences: the run goes on with the new values, so it will not
    match a fresh run.
    Returns the differing keys."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.json"
    changed = []
    if path.exists() and (workdir / "checkpoints").exists():
        old, new = _flat(json.loads(path.read_text())), _flat(json.loads(config.to_json()))
        changed = sorted(
            k
            for k in old.keys() | new.keys()
            if k not in _RESUME_NEUTRAL and old.get(k) != new.get(k)
        )
        if changed:
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            warnings.warn(
                f"resuming {workdir} with a different config ({diffs}); the run continues with "
                "the new values, so it will not match a run trained with either config from the "
                "start. Use a new --workdir to start over.",
                stacklevel=2,
            )
    write_json_atomic(path, config.to_dict())
    return changed


def load_run_config(
    workdir: str | os.PathLike, train_command: str, marker: str
) -> ml_collections.ConfigDict:
    """The config that ``train_command`` saved in ``workdir`` (for eval and predict); a
    config without the top-level key ``marker`` came from another command."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found; is {workdir} a work dir of `{train_command}`? Train first with "
            "this --workdir."
        )
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    if marker not in config:
        raise ValueError(
            f"{workdir} holds a run of another command, not a work dir of `{train_command}`."
        )
    return config


def load_history(workdir: Path, step: int) -> dict[str, list]:
    """The history up to the restored step (entries written after it are redone)."""
    path = workdir / "history.json"
    if not path.exists() or step == 0:
        return {"train": [], "epochs": []}
    history = json.loads(path.read_text())
    restored = {
        "train": [r for r in history["train"] if r["step"] <= step],
        "epochs": [r for r in history["epochs"] if r["step"] <= step],
    }
    window = history.get("window")
    if window and window.pop("step") == step:
        restored["window"] = window
    return restored


def _epoch_mean_loss(records: list[dict], epoch: int) -> float:
    rows = [r for r in records if r["epoch"] == epoch]
    return sum(r["loss"] * r["examples"] for r in rows) / max(sum(r["examples"] for r in rows), 1)


# ----------------------------------------------------------------------------- Ctrl-C


class _StopFlag:
    """The first Ctrl-C (SIGINT) or SIGTERM (SLURM preemption, ``timeout``, ``kill``) asks the
    loop to save and stop after the current step; a second one interrupts at once."""

    _SIGNALS: ClassVar[dict[int, str]] = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self):
        self.requested: str | None = None  # the signal's name once one came
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = self._SIGNALS[signum]
            tqdm.write(
                f"{self.requested}: saving a checkpoint after this step (send it again to abort)."
            )

        for signum in self._SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not in the main thread
                pass
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


@contextlib.contextmanager
def _record_failure(save_history: Callable[[], None], history: dict):
    """An exception that ends the run is written to history.json as ``failed: <reason>``
    (unless the loop already wrote a more precise status, such as ``diverged``)."""
    try:
        yield
    except BaseException as e:
        if history.get("status") == "running":
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            history["status"] = f"failed: {type(e).__name__}: {reason}"[:300]
            save_history(keep_status=True)
        raise


# -------------------------------------------------------------------------------- loop


def train_and_evaluate(
    task: Task,
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    stop_at_step: int = 0,
) -> dict[str, Any]:
    """Trains ``task`` for ``config.epochs``, evaluating ``config.eval_split`` each epoch.

    Resumes from ``workdir`` if it holds a checkpoint. Returns the history dict; its
    ``status`` is ``"done"`` (every epoch finished) or ``"interrupted"`` (Ctrl-C, SIGTERM or
    ``stop_at_step``); ``history.json`` also says ``"running"`` while it runs, ``"diverged"``
    or ``"failed: <reason>"``. ``stop_at_step`` > 0 stops after that step as a first Ctrl-C
    would (for tests of the resume). Besides each epoch's end, the latest state is saved every
    ``config.checkpoint_every_minutes`` (0: only at epoch ends), so a kill -9 costs at most
    that much work; resuming from such a save is bitwise the same as not stopping.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)

    steps_per_epoch = len(task.train_batches(0))
    tx = build_optimizer(config, steps_per_epoch)
    params = task.init_params(init_rng)
    state = TrainState.create(params, tx, getattr(task, "frozen_keys", ()))
    counts = parameter_counts(state)
    tqdm.write(f"parameters: {counts['total']:,} total, {counts['trainable']:,} trainable")
    ckpt = checkpoints.Checkpoints(workdir / "checkpoints")
    state = ckpt.restore_latest(state)
    start_step = int(state.step)
    parallel = DataParallel(config.devices, config.batch_size, config.eval_batch_size)
    state = parallel.replicate(state)
    history = load_history(workdir, start_step)
    history["config"] = config.to_dict()
    history["parameters"] = counts
    if start_step:
        tqdm.write(f"Resuming from step {start_step} in {workdir}.")

    train_step = make_train_step(task, step_rng)
    eval_step = make_eval_step(task)
    unit = getattr(task, "unit", "img")
    best = max((r[config.best_metric] for r in history["epochs"]), default=-math.inf)
    status = "running"
    every_s = 60 * config.checkpoint_every_minutes
    if jax.process_count() > 1:  # processes must agree on every save: clocks do not
        every_s = 0
    last_save = time.monotonic()

    def save_history(keep_status: bool = False):
        if not keep_status:
            history["status"] = status
        write_json_atomic(workdir / "history.json", history)

    def draw_curves():
        if history["epochs"] and is_main_process():
            plots.plot_history(history, config.eval_split, workdir / "curves.png")

    def stop_here(step):
        ckpt.save_latest(state)
        save_history()
        draw_curves()  # with the train losses of the unfinished epoch
        history["stopped_by"] = stop.requested or "stop_at_step"  # for the exit code
        tqdm.write(
            f"Stopped at step {step} ({history['stopped_by']}); checkpoint saved in "
            f"{ckpt.directory}. Run the same command again to resume."
        )

    save_history()
    writer = MetricWriter(workdir)

    # closing: the asynchronous checkpoint writes finish before anything reads the work dir.
    with (
        _StopFlag() as stop,
        contextlib.closing(ckpt),
        contextlib.closing(writer),
        _record_failure(save_history, history),
    ):
        for epoch in range(start_step // steps_per_epoch, config.epochs):
            batches = task.train_batches(epoch)
            first_step_of_epoch = epoch * steps_per_epoch
            first = int(state.step) - first_step_of_epoch
            bar = tqdm(
                range(first, steps_per_epoch),
                desc=f"epoch {epoch + 1}/{config.epochs}",
                initial=first,
                total=steps_per_epoch,
                disable=not config.progress or not is_main_process(),
                leave=False,
            )
            # The loss accumulated since the last log line survives an interruption.
            window = history.pop("window", None) or {"loss_sum": 0.0, "count": 0.0}
            t0, seen = time.perf_counter(), 0
            pending = []  # step sums still on the device: reading each one would stall it
            for i in bar:
                state, sums = train_step(state, parallel.shard_batch(batches[i]))
                pending.append(sums)
                step = first_step_of_epoch + i + 1
                stopping = stop.requested or (stop_at_step and step == stop_at_step)
                log_now = step % config.log_every_steps == 0 or i == steps_per_epoch - 1
                if not (log_now or stopping or step % _READ_EVERY_STEPS == 0):
                    continue
                for j, sums in enumerate(jax.device_get(pending)):
                    if not np.isfinite(sums["loss_sum"]):
                        status = "diverged"
                        save_history()
                        raise TrainingDiverged(
                            f"loss is {sums['loss_sum']} at step {step - len(pending) + j + 1} "
                            f"(epoch {epoch + 1}). "
                            f"The last good checkpoint (step {ckpt.latest_step()}) is kept in "
                            f"{ckpt.directory}. Lower the learning rate or add grad_clip_norm."
                        )
                    window = {k: window[k] + float(sums[k]) for k in window}
                    seen += float(sums["count"])
                pending = []
                bar.set_postfix(
                    loss=f"{sums['loss_sum'] / max(sums['count'], 1):.4f}",
                    **{f"{unit}_s": f"{seen / (time.perf_counter() - t0):.0f}"},
                )
                if log_now:
                    n = window["count"]
                    loss = window["loss_sum"] / max(n, 1.0)
                    history["train"].append(
                        {"step": step, "epoch": epoch + 1, "loss": loss, "examples": n}
                    )
                    writer.scalars(step, {"train/loss": loss})
                    window = {"loss_sum": 0.0, "count": 0.0}
                    if step % config.log_every_steps == 0 and config.progress:
                        tqdm.write(f"step {step:6d}  epoch {epoch + 1}  train loss {loss:.4f}")
                if stopping and i < steps_per_epoch - 1:  # at an epoch's end, evaluate first
                    status = "interrupted"
                    history["window"] = {**window, "step": step}
                    stop_here(step)
                    return history
                if every_s and i < steps_per_epoch - 1 and time.monotonic() - last_save >= every_s:
                    # Mid-epoch: the loss since the last log line is saved too (bitwise resume).
                    history["window"] = {**window, "step": step}
                    ckpt.save_latest(state)
                    save_history()
                    del history["window"]
                    last_save = time.monotonic()
            bar.close()
            train_time = time.perf_counter() - t0
            metrics = evaluate(task, state.params, config.eval_split, eval_step, parallel)
            record = {
                "epoch": epoch + 1,
                "step": int(state.step),
                "train_loss": _epoch_mean_loss(history["train"], epoch + 1),
                f"{config.eval_split}_loss": metrics["loss"],
                f"{config.eval_split}_accuracy": metrics["accuracy"],
                "train_time_s": train_time,
                "images_per_s": seen / train_time,
            }
            history["epochs"].append(record)
            is_best = record[config.best_metric] > best
            best = max(best, record[config.best_metric])
            ckpt.save_latest(state)
            last_save = time.monotonic()
            if is_best:
                ckpt.save_best(state, record)
            save_history()
            split = config.eval_split
            writer.scalars(
                record["step"],
                {
                    "train/epoch_loss": record["train_loss"],
                    f"{split}/loss": metrics["loss"],
                    f"{split}/accuracy": metrics["accuracy"],
                    f"train/{unit}_per_s": record["images_per_s"],
                },
            )
            writer.flush()
            draw_curves()  # the curves so far, redrawn after every epoch
            tqdm.write(
                f"epoch {epoch + 1:3d}/{config.epochs}  train loss {record['train_loss']:.4f}  "
                f"{config.eval_split} loss {metrics['loss']:.4f}  "
                f"{config.eval_split} acc {100 * metrics['accuracy']:.2f}%  "
                f"({train_time:.0f} s, {record['images_per_s']:.0f} {unit}/s)"
                + ("  *best" if is_best else "")
            )
            if (stop.requested or stop_at_step == int(state.step)) and epoch + 1 < config.epochs:
                status = "interrupted"
                stop_here(int(state.step))
                return history
    status = "done"  # every epoch finished (also when there was none left to run)
    save_history()
    return history
