"""A training config's values, checked before a run touches its workdir or compiles anything."""

from __future__ import annotations

from gmic_jax.augment import AugmentConfig
from gmic_jax.checkpoint import SelectionRule
from gmic_jax.config import GMICConfig
from gmic_jax.preprocessing import NORMALIZATIONS
from gmic_jax.train.config_lib import ConfigError, flat_fields, parse_profile_steps
from gmic_jax.train.defaults import GAP_MARGIN, GAP_WEIGHT
from gmic_jax.train.heads import PREDICTIONS
from gmic_jax.train.loss import SALIENCY_REDUCTIONS
from gmic_jax.train.sampling import SOURCES
from gmic_jax.train.state import learning_rate_schedule
from gmic_jax.train.step import BATCH_NORM_MODES
from gmic_jax.train.writers import JSONL_KEYS


def check_config(config) -> None:
    """Raise :class:`ConfigError` naming the first field of a training config whose value no run
    can use (checked before the run touches its workdir or compiles anything)."""

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
    if not config.loss.get("gap_weight", GAP_WEIGHT) >= 0:
        raise ConfigError(f"loss.gap_weight={config.loss.gap_weight!r}; expected a number >= 0")
    if not config.loss.get("gap_margin", GAP_MARGIN) > 0:
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
