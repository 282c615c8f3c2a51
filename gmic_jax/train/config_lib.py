"""Python configs (``configs/*.py`` with ``get_config()``) and ``--config.x=y`` overrides.

    config = load_config("configs/synthetic.py")            # or "configs/ablation.py:gap"
    apply_overrides(config, ["optimizer.learning_rate=3e-4", "model.K=3"])

A config file's ``get_config(arg=None)`` returns an ``ml_collections.ConfigDict``; the text after
``:`` in the path is passed as ``arg``. Override values are parsed as Python literals where they
parse (numbers, tuples, booleans, None) and kept as strings otherwise; ConfigDict checks the type.

Every mistake in a config, its path or an override is a :class:`ConfigError` whose message names
the file or field (the CLI prints it on one line and exits 2);
:func:`gmic_jax.train.config_check.check_config` finds the invalid values before a run touches its
workdir. This module imports nothing heavy: the command line parses overrides with it before it
imports the library.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import traceback
from pathlib import Path
from typing import Iterable


class ConfigError(ValueError):
    """A config file, override or value that cannot be used; the message names it."""


def load_config(spec: str):
    path, _, arg = str(spec).partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"gmic_config_{file.stem}", file)
    if module_spec is None or file.suffix != ".py":
        raise ConfigError(f"{path} is not a config: expected a Python file with get_config() (configs/*.py)")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if get_config is None:
            raise ConfigError(f"{path} is not a config: it has no get_config()")
        config = get_config(arg) if arg else get_config()
    except ConfigError:
        raise
    except Exception as e:  # the user's config code failed: name the file and line, not our stack
        raise ConfigError(f"{path}: {_where(e, file)}{type(e).__name__}: {e}") from None
    if not hasattr(config, "to_dict"):
        raise ConfigError(f"{path}: get_config() returned a {type(config).__name__}, not an ml_collections.ConfigDict")
    return config


def _where(error: BaseException, file: Path) -> str:
    if isinstance(error, SyntaxError) and error.lineno:
        return f"line {error.lineno}: "
    lines = [
        f.lineno for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() == file.resolve()
    ]
    return f"line {lines[-1]}: " if lines else ""


def flat_fields(config, prefix: str = "") -> dict:
    """{'a.b': value} of every leaf field of a ConfigDict (or a dict of dicts)."""
    out = {}
    for k, v in config.items():
        if hasattr(v, "items"):
            out.update(flat_fields(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unknown_field(config, key: str) -> ConfigError:
    fields = list(flat_fields(config))
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    if not close:  # a wrong case or a missing section: compare case-insensitively, then by leaf name
        lower = {f.lower(): f for f in fields}
        close = [lower[m] for m in difflib.get_close_matches(key.lower(), list(lower), n=1, cutoff=0.6)]
    if not close:
        leaf = key.rsplit(".", 1)[-1].lower()
        close = [f for f in fields if f.rsplit(".", 1)[-1].lower() == leaf][:1]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"config has no field {key!r}{hint}")


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
            raise ConfigError(f"config override {item!r} is not KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node or not hasattr(node[p], "items"):
                raise _unknown_field(config, key)
            node = node[p]
        if leaf not in node:
            raise _unknown_field(config, key)
        if hasattr(node[leaf], "items"):
            raise ConfigError(
                f"--config.{key} is a section; set one of its fields, e.g. "
                f"--config.{next(iter(flat_fields(node[leaf], key + '.')), key)}=..."
            )
        value = _parse(text)
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, float) and isinstance(value, str):
            try:
                value = float(text)  # 'nan', 'inf'
            except ValueError:
                raise ConfigError(f"--config.{key}={text}: expected a number") from None
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(old, str) and not isinstance(value, str):
            value = text
        try:
            node[leaf] = value
        except (TypeError, ValueError):
            raise ConfigError(f"--config.{key}={text}: expected a {type(old).__name__} (like {old!r})") from None
    return config


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.x=y`` / ``--config.x y`` overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            body = a[len("--config.") :]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{a} needs a value ({a}=VALUE)")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(a)
        i += 1
    return rest, overrides


PROFILE_STEPS_FORM = (
    "expected 'FIRST:LAST' (trace steps FIRST to LAST, 1-based as the log counts them, "
    "1 <= FIRST <= LAST, e.g. '10:12'), or '' (no trace)"
)


def parse_profile_steps(value) -> tuple[int, int] | None:
    """(first, last) of ``config.profile_steps`` ('FIRST:LAST', 1-based, both included), or None
    for ''; anything else is a :class:`ConfigError` naming the field and the expected form."""
    if value is None or value == "":
        return None
    first, sep, last = str(value).partition(":")
    try:
        if not sep or isinstance(value, bool):
            raise ValueError
        first, last = int(first), int(last)
    except ValueError:
        raise ConfigError(f"profile_steps={value!r}; {PROFILE_STEPS_FORM}") from None
    if not 1 <= first <= last:
        raise ConfigError(f"profile_steps={value!r}; {PROFILE_STEPS_FORM}")
    return first, last
