"""Python configs (``configs/*.py`` with ``get_config()``) and ``--config.x=y`` overrides.

    config = load_config("configs/synthetic.py")            # or "configs/ablation.py:gap"
    apply_overrides(config, ["optimizer.learning_rate=3e-4", "model.K=3"])

A config file's ``get_config(arg=None)`` returns an ``ml_collections.ConfigDict``; the text after
``:`` in the path is passed as ``arg``. Override values are parsed as Python literals where they
parse (numbers, tuples, booleans, None) and kept as strings otherwise; ConfigDict checks the type.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Iterable


def load_config(spec: str):
    path, _, arg = str(spec).partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"gmic_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def _parse(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, overrides: Iterable[str]):
    """Apply ``a.b=value`` overrides in place; an unknown key is an error naming it."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"config override {item!r} is not KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node:
                raise KeyError(f"config has no field {key!r} ({p!r} is unknown)")
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config has no field {key!r}")
        value = _parse(text)
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, float) and isinstance(value, str):
            value = float(text)  # 'nan', 'inf'; anything else raises ValueError naming the text
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(old, str) and not isinstance(value, str):
            value = text
        node[leaf] = value
    return config


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.x=y`` / ``--config.x y`` overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            body = a[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ValueError(f"{a} needs a value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(a)
        i += 1
    return rest, overrides
