"""Python configs (``configs/*.py`` with ``get_config()``) and ``--config.x=y`` overrides.

    config = load_config("configs/synthetic.py")            # or "configs/ablation.py:gap"
    apply_overrides(config, ["optimizer.learning_rate=3e-4", "model.K=3"])

A config file's ``get_config(arg=None)`` returns an ``ml_collections.ConfigDict``; the text after
``:`` in the path is passed as ``arg``. Override values are parsed as Python literals where they
parse (numbers, tuples, booleans, None) and kept as strings otherwise; ConfigDict checks the type.

Every mistake in a config, its path or an override is a :class:`ConfigError` whose message names
the file or field (the CLI prints it on one line and exits 2); :func:`check_config` finds the
invalid values before a run touches its workdir.
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


def check_config(config) -> None:
    """Raise :class:`ConfigError` naming the first field of a training config whose value no run
    can use (checked before the run touches its workdir or compiles anything)."""
    from gmic_jax.augment import AugmentConfig
    from gmic_jax.checkpoint import SelectionRule
    from gmic_jax.config import GMICConfig
    from gmic_jax.preprocessing import NORMALIZATIONS
    from gmic_jax.train.defaults import PREDICTIONS
    from gmic_jax.train.loop import JSONL_KEYS
    from gmic_jax.train.loss import SALIENCY_REDUCTIONS
    from gmic_jax.train.sampling import SOURCES
    from gmic_jax.train.state import learning_rate_schedule
    from gmic_jax.train.step import BATCH_NORM_MODES

    def choice(field, allowed):
        value = config
        for part in field.split("."):
            value = value[part]
        if value not in allowed:
            raise ConfigError(f"{field}={value!r}; expected one of {tuple(allowed)}")

    try:
        GMICConfig.from_dict(config.model.to_dict())
        learning_rate_schedule(config.optimizer, 1)
        AugmentConfig.from_dict({k: v for k, v in config.augment.to_dict().items() if k != "enabled"})
        SelectionRule(config.best_metric, config.best_min_delta)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    choice("data.source", SOURCES)
    choice("data.normalization", NORMALIZATIONS)
    choice("batch_norm", BATCH_NORM_MODES)
    choice("loss.saliency_reduction", SALIENCY_REDUCTIONS)
    choice("eval.prediction", PREDICTIONS)
    choice("best_metric", [k for k in JSONL_KEYS if k.startswith("val_")])
    for field, least in (
        ("batch_size", 1),
        ("num_epochs", 1),
        ("log_every_steps", 1),
        ("checkpoint_every_steps", 1),
        ("keep_latest", 1),
        ("eval.batch_size", 1),
        ("eval.every_epochs", 0),
        ("data.workers", 0),
    ):
        value = flat_fields(config).get(field, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(
                f"{field}={value!r}; expected an integer >= {least}"
                + (" (0: no evaluation)" if field == "eval.every_epochs" else "")
                + (" (0: load in the training process)" if field == "data.workers" else "")
            )
    if not config.loss.get("gap_weight", 0.0) >= 0:
        raise ConfigError(f"loss.gap_weight={config.loss.gap_weight!r}; expected a number >= 0")
    if not config.loss.get("gap_margin", 1.0) > 0:
        raise ConfigError(f"loss.gap_margin={config.loss.gap_margin!r}; expected a number > 0")
    if config.loss.beta < 0:  # nan passes: the divergence test trains with it on purpose
        raise ConfigError(f"loss.beta={config.loss.beta!r}; expected a number >= 0")
    parse_profile_steps(config.get("profile_steps", ""))
    if config.data.source == "cache" and not (config.data.train_cache and config.data.val_cache):
        raise ConfigError("data.source='cache' needs data.train_cache and data.val_cache (`gmic-jax cache` outputs)")
    if config.data.get("window_noise", False) and config.data.source != "cache":
        raise ConfigError(
            "data.window_noise=True needs data.source='cache' (a cache built with "
            "`gmic-jax cache --source exam-list ... --window-noise`)"
        )
