"""A run's files in its work dir besides the checkpoints: ``config.json`` (what was trained)
and ``history.json`` (what happened), each written atomically."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import ml_collections

from hw2jax.errors import Hw2jaxError, InputError, MissingFileError
from hw2jax.train.sharding import is_main_process


class WorkdirBusy(Hw2jaxError):
    """Another process is training in this work dir."""


@contextlib.contextmanager
def exclusive(workdir: Path):
    """One training process per work dir: an OS lock on ``workdir/.lock`` (with the holder's
    PID in it), held for the block. The OS drops it when its process ends in any way, kill -9
    included, so a lock is never left stale. With several processes (jax.distributed) sharing
    the work dir, process 0 holds it."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"--workdir {workdir} is a file, not a folder; pass a folder's path.")
    if not is_main_process():
        yield
        return
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError as e:
        raise InputError(
            f"cannot write in --workdir {workdir} ({e.strerror}); pass a folder you can write to."
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise WorkdirBusy(
            f"{workdir} is in use by another training process (PID {holder}); wait for it to "
            "end, stop it (Ctrl-C saves a checkpoint), or pass another --workdir."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def held_by_a_process(workdir: Path) -> bool:
    """Whether a training process holds ``workdir``'s lock now (it is running)."""
    path = Path(workdir) / ".lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken here
    return False


def status(workdir: Path, history: dict) -> str:
    """The history's status, except that ``running`` with no process holding the work dir's
    lock (after kill -9, a crash, a power cut: nothing could write) says so."""
    value = history.get("status", "unknown")
    if value == "running" and not held_by_a_process(workdir):
        return (
            "stopped without a word (killed, crashed or cut off while running; no process "
            "holds the work dir): run the same command to resume from the last checkpoint"
        )
    return value


def one_process_per_workdir(check_config):
    """Decorates ``train(config, workdir, ...)``: ``check_config(config)`` first, so that a bad
    config is refused before the work dir is made, then ``train`` under :func:`exclusive`."""

    def decorate(train):
        @functools.wraps(train)
        def locked(config, workdir, *args, **kwargs):
            check_config(config)
            with exclusive(Path(workdir)):
                return train(config, workdir, *args, **kwargs)

        return locked

    return decorate


def write_json_atomic(path: Path, data: Any) -> None:
    if not is_main_process():  # several processes share the work dir
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_json(path: Path, fix: str) -> Any:
    """The JSON in ``path``; a damaged file (cut short by a crash, edited by hand) is one
    :class:`InputError` naming the file and ``fix``, not a traceback from the json module."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is damaged ({type(e).__name__}: {e}); {fix}") from None


def _as_setting(value: Any) -> str:
    """``value`` (read from config.json) as ``--set`` reads it back: strings bare, JSON's lists
    as the tuples the configs hold."""
    if isinstance(value, str):
        return value
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


class RecipeChanged(InputError):
    """A command would resume a run with another recipe than it was trained with."""


# Keys that say where or how to run, not what to train: changing them on resume is expected.
_RESUME_NEUTRAL = {
    "progress",
    "data_dir",
    "data_source",
    "devices",
    "checkpoint_every_minutes",
    "read_test",
    "eval_batch_size",
    "log_every_steps",
    "sweep",  # which runs a sweep makes, not what one of them trains
    "ablation",  # likewise: which variants `vit ablate` trains beside this run
}


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _recorded_config(workdir: Path) -> dict | None:
    """What the run in ``workdir`` was trained with: ``config.json``, or, when that is missing
    or damaged, the copy in ``history.json`` (said in one line); None when neither is there."""
    path, history = workdir / "config.json", workdir / "history.json"
    try:
        return read_json(path, "") if path.exists() else _config_of_history(history, path)
    except InputError:
        return _config_of_history(history, path)


def _config_of_history(history: Path, path: Path) -> dict | None:
    try:
        config = read_json(history, "").get("config") if history.exists() else None
    except InputError:
        config = None
    if config is not None:
        print(f"{path} is missing or damaged; its copy in {history} is used.", file=sys.stderr)
    return config


def save_run_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Writes ``workdir/config.json``, making the work dir if needed. When a checkpoint is
    there to resume from, ``config.json`` (or its copy in ``history.json``) is the record of
    what was trained: a config that
    trains something else (epochs, learning rate, model...) is refused with the differences,
    and nothing is written. Keys that only say where or how to run may change, and so may
    ``epochs`` under a constant learning rate: the longer run is then the one a fresh run of
    the new config trains. A key that the saved config lacks (one added to the schema since)
    is not a difference."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.json"
    saved = _recorded_config(workdir) if (workdir / "checkpoints").exists() else None
    if saved is not None:
        old, new = _flat(saved), _flat(json.loads(config.to_json()))
        neutral = _RESUME_NEUTRAL | ({"epochs"} if new.get("schedule") == "constant" else set())
        changed = sorted(
            k
            for k in old.keys() & new.keys()
            if k.split(".")[0] not in neutral and old[k] != new[k]
        )
        if changed:
            diffs = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed)
            keep = " ".join("--set " + shlex.quote(f"{k}={_as_setting(old[k])}") for k in changed)
            raise RecipeChanged(
                f"{workdir} holds a run trained with another config ({diffs}). Run the same "
                f"command as before to resume it (or add {keep} to this one), or pass a new "
                "--workdir to train the new one."
            )
    write_json_atomic(path, config.to_dict())


def load_run_config(
    workdir: str | os.PathLike, train_command: str, marker: str
) -> ml_collections.ConfigDict:
    """The config that ``train_command`` saved in ``workdir`` (for eval and predict); a
    config without the top-level key ``marker`` came from another command."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise MissingFileError(
            f"{path} not found; is {workdir} a work dir of `{train_command}`? Train first with "
            "this --workdir."
        )
    config = ml_collections.ConfigDict(
        read_json(path, f"train again with `{train_command}` and this --workdir to rewrite it.")
    )
    if marker not in config:
        raise InputError(
            f"{workdir} holds a run of another command, not a work dir of `{train_command}`."
        )
    return config


def load_history(workdir: Path, step: int, best: dict | None = None) -> dict[str, list]:
    """The history up to the restored step (entries written after it are redone). When
    ``history.json`` is gone but a checkpoint is resumed, the history starts again from the
    best checkpoint's record (``best``, its saved evaluation), and says so in one line."""
    path = workdir / "history.json"
    if not path.exists() and step == 0:
        return {"train": [], "epochs": []}
    if not path.exists():
        kept = [best] if best and best.get("step", step + 1) <= step else []
        print(
            f"{path} is missing; resuming from step {step} with "
            + ("only the best epoch's record" if kept else "no record")
            + " of the epochs before it (the checkpoints are intact).",
            file=sys.stderr,
        )
        return {"train": [], "epochs": kept}
    history = read_json(
        path,
        "move it aside to resume with an empty history (the checkpoints are intact), or pass "
        "a new --workdir to start over.",
    )
    restored = {
        "train": [r for r in history["train"] if r["step"] <= step],
        "epochs": [r for r in history["epochs"] if r["step"] <= step],
    }
    for kept in ("failed_saves", "machines"):  # records of the whole run, not of steps
        if history.get(kept):
            restored[kept] = history[kept]
    window = history.get("window")
    if window and window.pop("step") == step:
        restored["window"] = window
    return restored
