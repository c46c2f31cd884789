"""Configs are Python functions returning a nested :class:`Config`; the command line overrides existing keys only.

    python -m tools.train --config configs/classification/fashion_mnist.py:runlocal --set train.steps=50

``path.py:arg`` calls ``get_config(arg)`` of that file. ``--set key.sub=value`` parses ``value`` as a Python
literal (falling back to a plain string) and fails, listing the valid keys, when ``key.sub`` does not exist:
a typo never silently trains something else. The value must have the type of the default it replaces (an int
where an int was, a list where a list was; None and None defaults take anything), and :func:`check_config` then
checks the engine's keys against their allowed values and ranges, so a bad value is named before a run starts.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config value (or file) that cannot be used; the message names the key, the value and what was expected."""


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
        raise ConfigError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg) function")
    config = module.get_config(arg or None)
    return Config(config)


def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"[8, 16]"`` -> [8, 16], ``"None"`` -> None, ``"adamw"`` -> "adamw"."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:  # "nan", "inf": numbers (which the value checks then refuse where a finite one is needed)
        return float(text) if text.lower().lstrip("+-") in ("nan", "inf", "infinity") else text
    except ValueError:
        return text


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``key.sub=value`` strings to a copy of ``config``; unknown keys are an error listing valid ones."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        *parents, leaf = key.strip().split(".")
        node = config
        for depth, part in enumerate(parents):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parents[:depth]) or "the top level"
                raise ConfigError(f"unknown config key {key!r}: {where} has {_keys(node)}")
            node = node[part]
        if not isinstance(node, dict) or leaf not in node:
            where = ".".join(parents) or "the top level"
            raise ConfigError(f"unknown config key {key!r}: {where} has {_keys(node)}")
        value = _like_default(key.strip(), node[leaf], parse_value(text.strip()))
        node[leaf] = Config(value) if isinstance(value, dict) else value
    return config


def _like_default(key: str, default: Any, value: Any) -> Any:
    """``value`` if it has the type of ``default`` (ints pass for floats; None either way), else a ConfigError."""
    if default is None or value is None or key in _ANY_TYPE:
        return value
    kinds = [(bool, "true/false (True or False)"), (int, "an integer"), (float, "a number"), (str, "a string"),
             ((list, tuple), "a list, e.g. [8, 16]"), (dict, "a dict, e.g. {'a': 1}")]  # fmt: skip
    expected, name = next((k, n) for k, n in kinds if isinstance(default, k))
    if isinstance(value, bool) != (expected is bool):
        ok = False
    elif expected is float:
        ok, value = isinstance(value, int | float), float(value) if isinstance(value, int | float) else value
    elif expected is int and isinstance(value, float) and value.is_integer():
        ok, value = True, int(value)  # 1e3 -> 1000
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {name} like its default {default!r}, got {type(value).__name__}")
    return list(value) if isinstance(value, tuple) else value


# Keys whose value may take several types: checked by their rule in _RULES instead.
_ANY_TYPE = {"data.value_range", "data.image_size"}


def _keys(node: Any) -> str:
    return ", ".join(sorted(node)) if isinstance(node, dict) else f"no keys (it is {node!r})"


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as JSON, atomically (a crash leaves the previous file whole)."""
    from flexivit.files import atomic_write_text

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


# ---------------------------------------------------------------------------------------------- value checks
# The engine's keys (configs/common.py) and the data keys every task shares, with what each accepts. A check
# returns None when the value is fine, else what was expected. Task-specific keys are checked by their task.


def _number(value, *, low=None, high=None, integer=False, low_open=False, high_open=False) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        return "an integer" if integer else "a number"
    if not math.isfinite(value):
        return "a finite number"
    if low is not None and (value < low or (low_open and value == low)):
        return f"{'> ' if low_open else '>= '}{low}"
    if high is not None and (value > high or (high_open and value == high)):
        return f"{'< ' if high_open else '<= '}{high}"
    return None


def _positive_int(value) -> str | None:
    return _number(value, low=1, integer=True) and "a positive integer"


def _count(value) -> str | None:
    return _number(value, low=0, integer=True) and "an integer >= 0"


def _one_of(*choices):
    return lambda value: None if value in choices else "one of " + ", ".join(map(repr, choices))


def _optional(check):
    return lambda value: None if value is None else (check(value) and f"None or {check(value)}")


def _patch_size(value) -> str | None:
    pair = list(value) if isinstance(value, list | tuple) else [value]
    bad = len(pair) not in (1, 2) or any(_positive_int(v) for v in pair)
    return "a positive patch size (an integer or [height, width])" if bad else None


def _patch_sizes(value) -> str | None:
    if not isinstance(value, list | tuple) or not value:
        return "a non-empty list of patch sizes, e.g. [16, 8]"
    return next((f"a list of patch sizes; {v!r} is not one" for v in value if _patch_size(v)), None)


def _image_size(value) -> str | None:
    return _patch_size(value) and "a positive image size (an integer or [height, width])"


def _value_range(value) -> str | None:
    if value == "imagenet":
        return None
    ok = isinstance(value, list | tuple) and len(value) == 2 and not any(_number(v) for v in value)
    return None if ok and value[0] < value[1] else '[low, high] with low < high, or "imagenet"'


def _betas(value) -> str | None:
    ok = isinstance(value, list | tuple) and len(value) == 2
    return None if ok and not any(_number(b, low=0, high=1, high_open=True) for b in value) else "[b1, b2] in [0, 1)"


def _regexes(value) -> str | None:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        return "a list of regular expressions"
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as error:
            return f"valid regular expressions ({pattern!r}: {error})"
    return None


def _lr_mults(value) -> str | None:
    if not isinstance(value, dict) or _regexes(list(value)) or any(_number(v, low=0) for v in value.values()):
        return "a dict {regex: multiplier >= 0}"
    return None


_RULES = {
    "seed": _count,
    "patch_sizes.kind": _one_of("fixed", "uniform", "weighted", "curriculum"),
    "optim.name": _one_of("sgd", "adamw"),
    "optim.lr": lambda v: _number(v, low=0, low_open=True) and "a finite learning rate > 0",
    "optim.weight_decay": lambda v: _number(v, low=0) and "a finite weight decay >= 0",
    "optim.momentum": lambda v: _number(v, low=0, high=1, high_open=True) and "a momentum in [0, 1)",
    "optim.betas": _betas,
    "optim.clip_norm": _optional(lambda v: _number(v, low=0, low_open=True) and "a finite norm > 0"),
    "optim.accum_steps": _positive_int,
    "optim.warmup_steps": _count,
    "optim.schedule": _one_of("cosine", "linear", "poly", "constant"),
    "optim.end_factor": lambda v: _number(v, low=0, high=1) and "a fraction in [0, 1]",
    "optim.lr_mults": _lr_mults,
    "optim.frozen": _regexes,
    "train.steps": _positive_int,
    "train.batch_size": _positive_int,
    "train.precision": _one_of("fp32", "bf16", "fp16"),
    "train.consistency.weight": lambda v: _number(v, low=0) and "a finite weight >= 0",
    "train.grad_checkpointing": _one_of(True, False),
    "train.compile": _one_of(True, False),
    "train.memory_check": _one_of(None, True, False),
    "train.tf32": _one_of(True, False),
    "train.log_every": _positive_int,
    "train.ckpt_every": _positive_int,
    "train.keep_ckpts": _positive_int,
    "eval.every": _count,
    "eval.final": _one_of(True, False),
    "eval.patch_sizes": _patch_sizes,
    "eval.batch_size": _positive_int,
    "data.image_size": _image_size,
    "data.value_range": _value_range,
    "data.num_workers": _count,
    "data.train_examples": _optional(_positive_int),
    "data.val_examples": _optional(_positive_int),
}


def check_config(config: Config) -> None:
    """Check every engine key against what it accepts; one ConfigError names each bad key, value and expectation.

    Also the patch sizes against the image: every sampled, evaluated or consistency size must fit ``data.image_size``
    (a border that does not tile is dropped, a larger patch is an error), and the sampler's keys must agree with its
    ``kind`` (a curriculum draws from its ``stages``, so ``sizes`` must name its last stage's sizes).
    """
    problems = []
    for key, rule in _RULES.items():
        node, *path = config, *key.split(".")
        for part in path:
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT and (expected := rule(node)):
            problems.append(f"{key}={node!r}: expected {expected}")
    if not problems:
        problems += _patch_size_problems(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


_ABSENT = object()


def _patch_size_problems(config: Config) -> list[str]:
    sampler = config.get("patch_sizes", {})
    image = config.get("data", {}).get("image_size")
    consistency = config.get("train", {}).get("consistency", {})
    problems, lists = [], {"patch_sizes.sizes": sampler.get("sizes"), "eval.patch_sizes": config.eval.patch_sizes}
    if consistency.get("weight"):
        lists["train.consistency.sizes"] = consistency.get("sizes")
    kind, stages = sampler.get("kind"), sampler.get("stages")
    if kind == "curriculum":
        if not stages or not isinstance(stages, list | tuple) or stages[0][0] != 0:
            return [f"patch_sizes.stages={stages!r}: expected [[0, {{'kind': ..., 'sizes': [...]}}], [step, ...], ...]"]
        last = list(stages[-1][1].get("sizes", []))
        if sorted(sampler.get("sizes") or []) != sorted(last):
            problems.append(
                f"patch_sizes.sizes={sampler.get('sizes')!r}: a curriculum draws from its stages, and its last stage "
                f"draws from {last}; change patch_sizes.stages, or to draw from sizes {sampler.get('sizes')!r} from "
                "the first step, also set patch_sizes.kind=uniform patch_sizes.stages=None"
            )
        lists.update({f"patch_sizes.stages[{i}].sizes": spec.get("sizes") for i, (_, spec) in enumerate(stages)})
    elif stages:
        problems.append(
            f"patch_sizes.stages is only read by patch_sizes.kind=curriculum (kind is {kind!r}): set it to None"
        )
    if kind == "fixed" and len(sampler.get("sizes") or []) != 1:
        problems.append(f"patch_sizes.sizes={sampler.get('sizes')!r}: a fixed sampler takes exactly one patch size")
    if kind != "weighted" and sampler.get("weights") is not None:
        problems.append(f"patch_sizes.weights is only read by patch_sizes.kind=weighted (kind is {kind!r})")
    if image is None or _image_size(image):
        return problems
    height, width = (image, image) if isinstance(image, int) else image
    for key, sizes in lists.items():
        if expected := _patch_sizes(sizes):
            problems.append(f"{key}={sizes!r}: expected {expected}")
            continue
        for patch in sizes:
            ph, pw = (patch, patch) if isinstance(patch, int) else patch
            if ph > height or pw > width:
                problems.append(f"{key}: patch size {patch} does not fit the {height}x{width} images (data.image_size)")
    return problems
