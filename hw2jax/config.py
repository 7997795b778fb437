"""Experiment configs: a Python file with ``get_config()``, ``key=value`` overrides, and one
schema that every config is checked against before any data loading or compilation.

A config file may ``import common`` (``experiments/common.py``: the shared loop defaults that
each experiment changes only where it differs), from beside it or from the shipped folder.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from hw2jax.errors import InputError, MissingFileError


class ConfigError(InputError):
    """A config key, type or value that cannot be used; the message names the valid choices."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One config key: its type(s) and, optionally, its choices or a range."""

    types: type | tuple[type, ...]
    help: str = ""
    choices: tuple | Callable[[], tuple] | None = None  # a callable: read when checking
    min: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound
    check: Callable[[Any], bool] | None = None  # extra rule, described by ``help``

    def problem(self, value: Any) -> str | None:
        """Why ``value`` does not fit, or None."""
        types = self.types if isinstance(self.types, tuple) else (self.types,)
        fits = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            fits = True
        if not fits:
            names = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            return f"expected {names}, got {type(value).__name__} {value!r}"
        choices = self.choices() if callable(self.choices) else self.choices
        if choices is not None and value not in choices:
            return f"got {value!r}; choose one of {', '.join(map(repr, choices))}"
        if self.min is not None and value is not None and value < self.min:
            return f"got {value!r}; it must be >= {self.min}"
        if self.above is not None and value is not None and value <= self.above:
            return f"got {value!r}; it must be > {self.above}"
        if self.check is not None and not self.check(value):
            return f"got {value!r}; {self.help}"
        return None


def _device_spec(value: str) -> bool:
    return value == "all" or (value.isdigit() and int(value) >= 1)


# The keys of the shared training loop (hw2jax.train.loop); experiments/common.py sets them.
LOOP_SCHEMA: dict[str, Field] = {
    "seed": Field(int),
    "epochs": Field(int, min=1),
    "batch_size": Field(int, min=1),
    "eval_batch_size": Field(int, min=1),
    "optimizer": Field(str, choices=("adam_l2", "adamw")),
    "learning_rate": Field(float, above=0.0),
    "weight_decay": Field(float, min=0.0),
    "schedule": Field(str, choices=("constant", "warmup_cosine")),
    "warmup_epochs": Field(float, min=0.0),
    "grad_clip_norm": Field(float, min=0.0),
    "log_every_steps": Field(int, min=1),
    "eval_split": Field(str),
    "best_metric": Field(str),
    "progress": Field(bool),
    "devices": Field(str, "'all' or a positive count", check=_device_spec),
    "data_dir": Field(str),
    "checkpoint_every_minutes": Field(float, min=0.0),
}


# The shipped configs: a config copied elsewhere may still `import common` or build on one.
_SHIPPED = Path(__file__).resolve().parent.parent / "experiments"


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Runs the config file ``path`` and returns its ``get_config()``. Its ``import common`` (or
    of another config) finds the file beside it first, then the shipped ``experiments/``. Any
    error in the file is one :class:`InputError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {path} not found; see experiments/ for the configs.")
    spec = importlib.util.spec_from_file_location(f"hw2jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    # The imported configs are found only while the file runs: modules of the same names
    # imported elsewhere stay as they were.
    folders = [str(path.parent)] + ([str(_SHIPPED)] if _SHIPPED.is_dir() else [])
    names = {p.stem for folder in folders for p in Path(folder).glob("*.py")}
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    sys.path[:0] = folders
    try:
        try:
            spec.loader.exec_module(module)
            if not callable(getattr(module, "get_config", None)):
                raise InputError(
                    f"config file {path} has no get_config() function; define one that "
                    "returns an ml_collections.ConfigDict (see experiments/ for examples)."
                )
            config = module.get_config()
        except InputError:
            raise
        except Exception as e:  # the user's file: where it failed is what they need
            raise InputError(_config_file_error(path, e)) from None
        if not isinstance(config, ml_collections.ConfigDict):
            raise InputError(
                f"get_config() in {path} returned a {type(config).__name__}, not an "
                "ml_collections.ConfigDict; return one (see experiments/ for examples)."
            )
        return config
    finally:
        for folder in folders:
            sys.path.remove(folder)
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def _config_file_error(path: Path, error: Exception) -> str:
    """One line: the file and line of a config that cannot be run, what failed, the fix."""
    if isinstance(error, SyntaxError):
        where = f"{error.filename}, line {error.lineno}"
        return f"config file {path} cannot be read: {where}: {error.msg}; fix the syntax there."
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename.endswith(".py")]
    ours = [f for f in frames if Path(f.filename).resolve().parent != Path(__file__).parent]
    last = (ours or frames)[-1]
    text = str(error).strip()
    what = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    fix = "fix the file there"
    if isinstance(error, ModuleNotFoundError):
        fix = (
            f"put {error.name}.py beside {path.name} (experiments/ has the shipped ones), "
            "or keep the config in experiments/"
        )
    return f"config file {path} fails at {last.filename}, line {last.lineno}: {what}; {fix}."


def _parse_value(text: str):
    if text.lower() in ("true", "false"):  # as a shell user would write them
        return text.lower() == "true"
    if text.lower() == "none":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as linear


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Applies ``a.b=value`` strings (``--set``): the text is read as a Python literal (or
    true/false/none as a shell user writes them, or else a bare string), then set as
    :func:`set_values` does."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. epochs=1.")
        _assign(config, key.strip(), _parse_value(text.strip()), text.strip())


def set_values(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    """Sets typed values (command-line flags) by dotted key: the key must exist and the type
    must fit its current value's (an int where a float is expected is widened)."""
    for key, value in values.items():
        _assign(config, key, value, repr(value))


def _assign(config: ml_collections.ConfigDict, key: str, value: Any, text: str) -> None:
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            _unknown(key, ".".join(parents[:depth]), node)
        child = node[part]
        if not isinstance(child, ml_collections.ConfigDict):
            groups = sorted(k for k, v in node.items() if isinstance(v, ml_collections.ConfigDict))
            raise ConfigError(
                f"{key}: {'.'.join(parents[: depth + 1])} is a single value "
                f"({type(child).__name__} {child!r}), not a group of settings. Set it "
                f"directly, e.g. {'.'.join(parents[: depth + 1])}=VALUE"
                + (f"; the groups are: {', '.join(groups)}." if groups else ".")
            )
        node = child
    if leaf not in node:
        _unknown(key, ".".join(parents), node)
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(
            f"{key} is a group of settings ({', '.join(sorted(current.keys()))}); set one of "
            f"them, e.g. {key}.{sorted(current.keys())[0]}=VALUE."
        )
    wrong_type = ConfigError(
        f"{key}={text!r}: expected {type(current).__name__} "
        f"(as its value {current!r} is), got {type(value).__name__}."
    )
    if isinstance(value, bool) and type(current) in (int, float):
        raise wrong_type  # ml_collections would take true as 1 or 1.0
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, str) and not isinstance(value, str):
        value = text  # --set name=1e3 for a string key keeps what was typed
    try:
        node[leaf] = value
    except TypeError:
        raise wrong_type from None


def _unknown(key: str, group: str, node) -> None:
    known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    where = f" in {group}" if group else ""
    raise ConfigError(f"unknown config key {key!r}; the keys{where} are: {', '.join(known)}.")


def batch_split_problem(devices: int, batch_sizes: Iterable[int]) -> str | None:
    """Why these batch sizes (train, eval) cannot be split evenly over ``devices`` for data
    parallel, or None."""
    for size in batch_sizes:
        if isinstance(size, int) and size > 0 and size % devices:
            return (
                f"batch size {size} does not split evenly over {devices} devices; set "
                f"batch_size and eval_batch_size to multiples of {devices} (e.g. --set "
                f"batch_size={max(size - size % devices, devices)}), or a device count that "
                "divides them (--host-devices auto picks one on CPU)"
            )
    return None


def check_config(config: Mapping, schema: Mapping[str, Field | Mapping]) -> None:
    """Checks every key of ``config`` against ``schema`` (nested mappings for groups): no
    unknown key, none missing, each value of its type and in its range, and the loop's
    cross-key rules. Raises one :class:`ConfigError` that names every problem and the fix."""
    problems = _check(config, schema, "")
    if not problems and "best_metric" in schema:
        want = f"{config['eval_split']}_accuracy"
        if config["best_metric"] != want:
            problems.append(
                f"best_metric {config['best_metric']!r} is not recorded; with "
                f"eval_split={config['eval_split']!r} it must be {want!r}"
            )
    # A count of devices is known here ('all' only once jax has started: the loop checks it).
    if not problems and "devices" in schema and str(config["devices"]).isdigit():
        sizes = (config["batch_size"], config["eval_batch_size"])
        if (problem := batch_split_problem(int(config["devices"]), sizes)) is not None:
            problems.append(problem)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _check(config: Mapping, schema: Mapping, prefix: str) -> list[str]:
    problems = []
    for key in sorted(set(config) - set(schema)):
        problems.append(
            f"unknown key {prefix}{key!s}; the keys{' in ' + prefix[:-1] if prefix else ''} are: "
            f"{', '.join(sorted(schema))}"
        )
    for key in sorted(set(schema) - set(config)):
        problems.append(f"missing key {prefix}{key}; add it to the config (see experiments/)")
    for key, field in schema.items():
        if key not in config:
            continue
        value = config[key]
        if isinstance(field, Mapping):
            if not isinstance(value, Mapping):
                problems.append(f"{prefix}{key} must be a group of settings, got {value!r}")
            else:
                problems += _check(value, field, f"{prefix}{key}.")
            continue
        problem = field.problem(value)
        if problem:
            problems.append(f"{prefix}{key}: {problem}")
    return problems
