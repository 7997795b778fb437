"""orbax-checkpoint managers for the latest state (resume) and the best params (evaluation).

orbax writes each checkpoint into a temporary folder and renames it when complete, so an
interrupted save never leaves a half-written checkpoint behind. Saves are asynchronous: orbax
copies the arrays to host memory before ``save`` returns (so the train step may donate their
buffers at once) and writes the files in a background thread while training goes on. ``wait``
(or ``close``) blocks until they are on disk. With several processes (jax.distributed) each save
is waited for at once: two background saves in flight there deadlocked orbax in our 2-process test.

The two newest ``latest`` steps are kept. A step that cannot be read (a deleted or damaged file)
is reported in one line, moved to ``checkpoints/damaged/`` and the next older one restored, so a
damaged checkpoint costs at most one checkpoint interval.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from hw2jax.errors import Hw2jaxError, MissingFileError


class CheckpointError(Hw2jaxError, RuntimeError):
    """No checkpoint of a work dir can be read; the message says how to go on."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a file-size limit); ``step`` names it
    and ``resume_step`` the newest one on disk, where a rerun goes on from."""

    def __init__(self, message: str, step: int, resume_step: int | None, reason: str):
        super().__init__(message)
        self.step, self.resume_step, self.reason = step, resume_step, reason


def _reason(error: Exception) -> str:
    """What went wrong, for one line of output: the first line of the innermost error orbax
    wraps (TensorStore's, which names the array and the damage; orbax's own adds a dump of
    the store), without the store's path, which the message names already."""
    while error.__cause__ is not None:
        error = error.__cause__
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    first = re.sub(r' in OCDBT database at local file "[^"]*"', "", first)
    return f"{type(error).__name__}: {first[:200]}"


_ORBAX_DIR = f"{os.sep}orbax{os.sep}"
# What orbax's reads and writes raise where nobody can catch it carries one of these.
_ORBAX_MARKS = (_ORBAX_DIR, "TensorStore", "OCDBT")


@functools.cache  # once per process
def _quiet_orbax_leftovers() -> None:
    """From now on (the first :class:`Checkpoints`), keep orbax's failures to our one line.
    Its background writes log a failure from each thread with a traceback: the log lines keep
    their text only. A failed read's other reads end with errors nobody retrieves, which
    asyncio logs as their tasks are collected; their coroutines raise again as they are
    closed (their except clause catches the GeneratorExit) or are never awaited; and
    TensorStore's callbacks find their event loop closed. Each would print a long traceback
    after our line, some at exit, when the garbage collector gets to them. Other unraisable
    errors, log records and warnings go where they went."""
    logging.getLogger("absl").addFilter(_OneLineOrbaxErrors())
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _orbax_leftover(unraisable.exc_value, unraisable.exc_traceback, unraisable.object):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_keep_unless_orbax_leftover)
    warnings.filterwarnings(
        "ignore", r"coroutine '_read_array_index_and_device_put' was never awaited", RuntimeWarning
    )


def _keep_unless_orbax_leftover(record: logging.LogRecord) -> bool:
    """False (drop it) for asyncio's "exception was never retrieved" of an orbax read."""
    if "exception was never retrieved" not in record.getMessage() or not record.exc_info:
        return True
    _, error, trace = record.exc_info
    return not _orbax_leftover(error, trace, None, record.getMessage())


def _orbax_leftover(error, trace, where, context: str = "") -> bool:
    """Whether an error raised out of reach came from orbax's reads or writes: orbax's code on
    its way or TensorStore's in its text, or asyncio's "Event loop is closed" with no other
    code on the way."""
    code = getattr(where, "cr_code", None)
    files = [frame.filename for frame in traceback.extract_tb(trace)]
    files += [code.co_filename] if code is not None else []
    text = "\n".join([*files, str(error), context])
    if any(mark in text for mark in _ORBAX_MARKS):
        return True
    closed = isinstance(error, RuntimeError) and "Event loop is closed" in str(error)
    return closed and bool(files) and all(f"{os.sep}asyncio{os.sep}" in f for f in files)


def path_names(path: tuple) -> tuple[str, ...]:
    """A jax key path as plain names: ("opt_state", "1", "mu", "bert", "layer_3", "kernel")."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _leaf_shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path of names: shape} for every array of a state or of a checkpoint's metadata."""
    return {
        path_names(path): tuple(getattr(leaf, "shape", ()))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


class _OneLineOrbaxErrors(logging.Filter):
    """orbax logs a failed background write from each of its threads with the traceback;
    :class:`CheckpointWriteError` reports the failure, so each log line keeps only its text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _ORBAX_DIR in record.pathname:
            record.exc_info, record.exc_text = None, None
        return True


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    def __init__(self, directory: str | Path):
        _quiet_orbax_leftovers()
        self.directory = Path(directory).absolute()
        keep_two = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        keep_one = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        # The handler named up front: a manager that has not saved yet reads metadata only so.
        self._latest = ocp.CheckpointManager(
            self.directory / "latest",
            options=keep_two,
            item_handlers=ocp.StandardCheckpointHandler(),
        )
        self._best = ocp.CheckpointManager(self.directory / "best", options=keep_one)

    @staticmethod
    def _payload(state) -> dict[str, Any]:
        return {"step": state.step, "params": state.params, "opt_state": state.opt_state}

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def committed_step(self) -> int | None:
        """The newest ``latest`` step whose write has finished (orbax renames a step's folder
        from its temporary name only then), read from the disk, not from the manager."""
        folder = self.directory / "latest"
        done = (
            [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
        )
        return max(done, default=None)

    def save_latest(self, state) -> None:
        step = int(state.step)
        if self._latest.latest_step() != step:
            with self._write_errors(step):
                self._latest.save(step, args=ocp.args.StandardSave(self._payload(state)))
            self._wait_if_distributed(step)

    def save_best(self, state, metrics: dict[str, float]) -> None:
        payload = {"step": state.step, "params": state.params}
        with self._write_errors(int(state.step)):
            self._best.save(
                int(state.step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(payload), metrics=ocp.args.JsonSave(metrics)
                ),
            )
        self._wait_if_distributed(int(state.step))

    def _wait_if_distributed(self, step: int) -> None:
        if jax.process_count() > 1:
            self.wait(step)

    def wait(self, step: int | None = None) -> None:
        """Blocks until every save started so far is complete on disk; a failed write (here or
        in the background) is a :class:`CheckpointWriteError`."""
        with self._write_errors(step):
            self._latest.wait_until_finished()
            self._best.wait_until_finished()

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        """orbax reports a failed background write at the next save or wait, with a long
        traceback from its thread; here it becomes one line naming the step and the fix."""
        try:
            yield
        except Exception as e:  # orbax and TensorStore raise many types for one cause
            step = self.latest_step() if step is None else step
            resume = self.committed_step()
            raise CheckpointWriteError(
                f"the checkpoint of step {step} could not be written in {self.directory} "
                f"({_reason(e)}). Free disk space (or raise the shell's file-size limit), then "
                f"run the same command again: it resumes from "
                + (f"step {resume}." if resume is not None else "the start."),
                step=step,
                resume_step=resume,
                reason=_reason(e),
            ) from e

    def best_metrics(self) -> dict[str, float] | None:
        """The evaluation saved with the best checkpoint, or None when there is none (or it
        cannot be read, which ``restore_best_params`` reports)."""
        self.wait()
        step = self._best.latest_step()
        if step is None:
            return None
        try:
            out = self._best.restore(step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore()))
        except Exception:  # orbax and TensorStore raise many types for one cause
            return None
        return dict(out.metrics)

    def restore_latest(self, state):
        """``state`` with the newest readable ``latest`` checkpoint's values, or unchanged when
        there is none. Unreadable steps are reported, set aside, and the next older one tried."""
        self.wait()
        target = _abstract(self._payload(state))
        steps = sorted(self._latest.all_steps(), reverse=True)
        for step in steps:
            try:
                metadata = self._latest.item_metadata(step)
            except Exception as e:  # orbax and TensorStore raise many types for one cause
                self._set_aside(step, e)
                continue
            if metadata is not None:
                self._check_same_structure(step, _leaf_shapes(metadata), _leaf_shapes(target))
            try:
                restored = self._latest.restore(step, args=ocp.args.StandardRestore(target))
            except Exception as e:  # orbax and TensorStore raise many types for one cause
                self._set_aside(step, e)
                continue
            return state.replace(**restored)
        if steps:
            raise CheckpointError(
                f"no checkpoint in {self.directory / 'latest'} can be read (steps "
                f"{', '.join(map(str, steps))}, moved to {self.directory / 'damaged'}). To start "
                f"over, delete {self.directory} or pass a new --workdir."
            )
        return state

    def _check_same_structure(self, step: int, saved: dict, wanted: dict) -> None:
        """A readable checkpoint of another model or optimizer is not damage: it stays where
        it is, and the run stops with what differs."""
        if saved == wanted:
            return
        differ = sorted(
            "/".join(k)
            + f" {saved.get(k, 'absent')} in the checkpoint, {wanted.get(k, 'absent')} now"
            for k in saved.keys() | wanted.keys()
            if saved.get(k) != wanted.get(k)
        )
        raise CheckpointError(
            f"the checkpoint of step {step} in {self.directory / 'latest'} holds another model or "
            f"optimizer than this config builds ({len(differ)} arrays differ, e.g. "
            f"{'; '.join(differ[:3])}). Resume with the config it was trained with (the "
            '"config" of history.json in the work dir), or pass a new --workdir to start over.'
        )

    def _set_aside(self, step: int, error: Exception) -> None:
        damaged = self.directory / "damaged" / f"latest-{step}-{int(time.time())}"
        print(
            f"checkpoint step {step} in {self.directory / 'latest'} cannot be read "
            f"({_reason(error)}); moved to {damaged}, trying the one before it.",
            file=sys.stderr,
        )
        damaged.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / "latest" / str(step)), damaged)
        self._latest.reload()

    def restore_best_params(self, params_like: Any) -> tuple[Any, dict[str, float]]:
        """The best params and their metrics; falls back to the latest checkpoint."""
        self.wait()
        step = self._best.latest_step()
        if step is not None:
            target = {"step": 0, "params": _abstract(params_like)}
            try:
                out = self._best.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), metrics=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # orbax and TensorStore raise many types for one cause
                raise CheckpointError(
                    f"the best checkpoint (step {step}) in {self.directory / 'best'} cannot be "
                    f"read ({_reason(e)}). Use the latest one instead (`hw2jax vit eval "
                    "--latest`), or train again with a new --workdir."
                ) from None
            return out.state["params"], dict(out.metrics)
        step = self._latest.latest_step()
        if step is None:
            raise MissingFileError(
                f"no checkpoint in {self.directory}; train first with the same --workdir."
            )
        out = self._latest.restore(step, args=ocp.args.StandardRestore())
        return out["params"], {"step": step}

    def close(self) -> None:
        """Waits for the writes in flight (a failed one is a :class:`CheckpointWriteError`),
        then closes both managers."""
        with self._write_errors(None):
            try:
                self._latest.close()
            finally:
                self._best.close()
