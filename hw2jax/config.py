"""Experiment configs: a Python file with ``get_config()``, plus ``key=value`` overrides."""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

import ml_collections


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found; see experiments/ for the configs.")
    spec = importlib.util.spec_from_file_location(f"hw2jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} has no get_config() function.")
    return module.get_config()


def _parse_value(text: str):
    if text.lower() in ("true", "false"):  # as a shell user would write them
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as linear


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Applies ``a.b=value`` strings; the key must exist, and the type must fit."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value, e.g. epochs=1.")
        *parents, leaf = key.strip().split(".")
        node = config
        for part in parents:
            if part not in node:
                raise KeyError(f"unknown config key {key!r}; known: {sorted(node.keys())}.")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"unknown config key {key!r}; known: {sorted(node.keys())}.")
        value = _parse_value(text.strip())
        if isinstance(node[leaf], float) and isinstance(value, int):
            value = float(value)
        if isinstance(node[leaf], str) and not isinstance(value, str):
            value = text.strip()
        try:
            node[leaf] = value
        except TypeError as e:
            raise TypeError(
                f"{key}={text!r}: expected {type(node[leaf]).__name__}, got {type(value).__name__}."
            ) from e
