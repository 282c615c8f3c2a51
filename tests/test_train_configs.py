"""Configs load, overrides parse, and each ablation config changes exactly what it claims."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from gmic_jax.config import GMICConfig
from gmic_jax.train.config_lib import ConfigError, apply_overrides, load_config, split_config_args
from gmic_jax.train.config_lib import flat_fields as _flat

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["synthetic", "synthetic_tiny", "cbis_ddsm", "nyu_paper"])
def test_named_configs_build_a_valid_model_config_and_document_their_command(name):
    c = load_config(str(CONFIGS / f"{name}.py"))
    cfg = GMICConfig.from_dict(c.model.to_dict())
    assert cfg.rotate_crops  # the paper's training-time crop rotation is on
    text = (CONFIGS / f"{name}.py").read_text()
    assert f"gmic-jax train --config configs/{name}.py" in text and "Cost:" in text
    if name in ("cbis_ddsm", "nyu_paper"):
        assert cfg.image_shape == (2944, 1920) and cfg.K == 6 and cfg.crop_shape == (256, 256)


ABLATIONS = [
    ("ablation_aggregation.py:gap", {"model.aggregation": "gap"}),
    ("ablation_aggregation.py:gmp", {"model.aggregation": "gmp"}),
    ("ablation_top_t.py:0.2", {"model.percent_t": 0.2}),
    ("ablation_k.py:1", {"model.K": 1}),
    ("ablation_k.py:3", {"model.K": 3}),
    ("ablation_uniform_attention.py", {"model.attention": "uniform"}),
    ("ablation_random_patches.py", {"model.patch_selection": "random"}),
    ("ablation_prediction.py:local", {"eval.prediction": "local"}),
    ("ablation_prediction.py:global", {"eval.prediction": "global"}),
    ("ablation_prediction.py:average", {"eval.prediction": "average"}),
    ("ablation_aggregation.py:gap,nyu_paper", {"model.aggregation": "gap"}),
]


@pytest.mark.parametrize("spec,expected", ABLATIONS, ids=[a[0] for a in ABLATIONS])
def test_each_ablation_changes_exactly_what_it_claims(spec, expected):
    file, _, arg = spec.partition(":")
    base_name = arg.partition(",")[2] or "synthetic"
    base = _flat(load_config(str(CONFIGS / f"{base_name}.py")))
    abl = _flat(load_config(str(CONFIGS / spec)))
    changed = {k for k in base if base[k] != abl[k]}
    assert changed == set(expected), changed
    for k, v in expected.items():
        assert abl[k] == v
    module_spec = importlib.util.spec_from_file_location("abl", CONFIGS / file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    assert module.CHANGES == set(expected)  # what the file declares is what it does
    GMICConfig.from_dict(load_config(str(CONFIGS / spec)).model.to_dict())  # still a valid model


def test_every_ablation_file_is_covered():
    files = {p.name for p in CONFIGS.glob("ablation_*.py")}
    assert files == {a[0].partition(":")[0] for a in ABLATIONS}


def test_prediction_choice_changes_the_scores():
    from gmic_jax.train.evaluate import prediction_scores

    out = {"y_global": np.array([[0.1, 0.2]]), "y_local": np.array([[0.3, 0.4]]), "y_fusion": np.array([[0.5, 0.9]])}
    np.testing.assert_allclose(prediction_scores(out, "global"), [[0.1, 0.2]])
    np.testing.assert_allclose(prediction_scores(out, "local"), [[0.3, 0.4]])
    np.testing.assert_allclose(prediction_scores(out, "fusion"), [[0.5, 0.9]])
    np.testing.assert_allclose(prediction_scores(out, "average"), [[0.3, 0.5]])
    with pytest.raises(ValueError, match="prediction"):
        prediction_scores(out, "max")


def test_overrides_and_argument_splitting():
    c = load_config(str(CONFIGS / "synthetic.py"))
    apply_overrides(
        c,
        [
            "optimizer.learning_rate=3e-4",
            "model.K=2",
            "model.crop_shape=(32, 32)",
            "data.source=cache",
            "optimizer.learning_rate=1",
            "augment.enabled=False",
        ],
    )
    assert c.optimizer.learning_rate == 1.0 and isinstance(c.optimizer.learning_rate, float)
    assert c.model.K == 2 and tuple(c.model.crop_shape) == (32, 32) and c.data.source == "cache"
    assert c.augment.enabled is False
    with pytest.raises(ConfigError, match="no field 'optimizer.nope'"):
        apply_overrides(c, ["optimizer.nope=1"])
    with pytest.raises(ConfigError, match="did you mean 'optimizer.learning_rate'"):
        apply_overrides(c, ["optimizer.learningrate=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_overrides(c, ["model.K"])
    rest, over = split_config_args(["--workdir", "w", "--config.model.K=3", "--config.seed", "4"])
    assert rest == ["--workdir", "w"] and over == ["model.K=3", "seed=4"]


def test_cli_parses_train_overrides(monkeypatch):
    from gmic_jax import cli
    from gmic_jax.train import main as train_cli

    seen = {}
    monkeypatch.setattr(train_cli, "main", lambda args: seen.setdefault("args", args) and 0)
    assert (
        cli.main(
            [
                "train",
                "--config",
                "configs/synthetic.py",
                "--workdir",
                "w",
                "--config.num_epochs=2",
                "--config.optimizer.learning_rate",
                "3e-4",
            ]
        )
        == 0
    )
    ns = seen["args"]
    assert ns.config_overrides == ["num_epochs=2", "optimizer.learning_rate=3e-4"] and ns.workdir == "w"
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", "c", "--workdir", "w", "--bogus"])


def test_loss_options_reach_the_train_step(tmp_path, monkeypatch):
    """The training loop hands loss.beta, gap_weight and gap_margin to the train step it builds."""
    from gmic_jax.train import loop

    class Built(Exception):
        pass

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise Built

    monkeypatch.setattr(loop, "make_train_step", record)
    c = load_config(str(CONFIGS / "synthetic_tiny.py"))
    apply_overrides(c, ["loss.gap_weight=4.0", "loss.gap_margin=0.25", "loss.beta=0.125", "data.workers=0"])
    with pytest.raises(Built):
        loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert (seen["gap_weight"], seen["gap_margin"], seen["beta"]) == (4.0, 0.25, 0.125)
