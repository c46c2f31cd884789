"""Configs are Python functions returning a nested :class:`Config`; the command line overrides existing keys only.

    python -m tools.train --config configs/classification/fashion_mnist.py:runlocal --set train.steps=50

``path.py:arg`` calls ``get_config(arg)`` of that file. ``--set key.sub=value`` parses ``value`` as a Python
literal (falling back to a plain string) and fails, listing the valid keys, when ``key.sub`` does not exist:
a typo never silently trains something else.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
from pathlib import Path
from typing import Any


class Config(dict):
    """A dict with attribute access whose nested dicts are Configs too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            if isinstance(value, dict) and not isinstance(value, Config):
                self[key] = Config(value)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r}; keys: {', '.join(sorted(self))}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = Config(value) if isinstance(value, dict) and not isinstance(value, Config) else value

    def __deepcopy__(self, memo):
        return Config(copy.deepcopy(dict(self), memo))

    def to_dict(self) -> dict:
        return json.loads(self.to_json())

    def to_json(self) -> str:
        return json.dumps(self, indent=2, sort_keys=True, default=str)


def load_config(spec: str) -> Config:
    """``"configs/x.py"`` or ``"configs/x.py:arg"`` -> ``get_config(arg)`` of that file."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} defines no get_config(arg) function")
    config = module.get_config(arg or None)
    return Config(config)


def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"[8, 16]"`` -> [8, 16], ``"None"`` -> None, ``"adamw"`` -> "adamw"."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``key.sub=value`` strings to a copy of ``config``; unknown keys are an error listing valid ones."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        *parents, leaf = key.strip().split(".")
        node = config
        for depth, part in enumerate(parents):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parents[:depth]) or "the top level"
                raise KeyError(f"unknown config key {key!r}: {where} has {_keys(node)}")
            node = node[part]
        if not isinstance(node, dict) or leaf not in node:
            where = ".".join(parents) or "the top level"
            raise KeyError(f"unknown config key {key!r}: {where} has {_keys(node)}")
        value = parse_value(text.strip())
        node[leaf] = Config(value) if isinstance(value, dict) else value
    return config


def _keys(node: Any) -> str:
    return ", ".join(sorted(node)) if isinstance(node, dict) else f"no keys (it is {node!r})"


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as JSON, atomically (a crash leaves the previous file whole)."""
    from flexivit.checkpoint import atomic_write_text

    atomic_write_text(path, config.to_json() + "\n")


def config_differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, "key: old -> new")`` for every leaf where two configs differ (compared as saved JSON)."""
    old, new = json.loads(json.dumps(old, default=str)), json.loads(json.dumps(new, default=str))
    out = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, prefix=name + ".")
        elif a != b:
            out.append((name, f"{name}: {a!r} -> {b!r}"))
    return out
