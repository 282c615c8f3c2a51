"""The preprocessing schema (gmic_jax.preprocessing): the canonical section, the one migration of
old spellings, and the config.json files gmic-jax 730583d wrote (tests/fixtures/config_730583d_*.json:
the converter's, a cache-trained run's and a synthetic run's), read without being rewritten."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from gmic_jax.augment import AugmentConfig, tta_augment
from gmic_jax.checkpoint import CheckpointError, read_config, save_checkpoint, write_config
from gmic_jax.config import GMICConfig
from gmic_jax.preprocessing import Preprocessing, SyntheticData, migrate

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD_CONFIGS = {
    "convert": "config_730583d_convert.json",
    "train_cache": "config_730583d_train_cache.json",
    "train_synthetic": "config_730583d_train_synthetic.json",
}


def old_config_dir(tmp_path, kind: str) -> Path:
    d = tmp_path / kind
    d.mkdir()
    shutil.copyfile(FIXTURES / OLD_CONFIGS[kind], d / "config.json")
    return d


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("convert", Preprocessing("original", (2944, 1920), "standardize", 100, 50)),
        ("train_cache", Preprocessing("original", (2944, 1920), "standardize", 100, 50)),
        (
            "train_synthetic",
            Preprocessing("window", (256, 192), "standardize", 100, 50, SyntheticData(0, 0.35, 0.35, (0.002, 0.006))),
        ),
    ],
)
def test_old_config_files_load_through_the_schema_unchanged(kind, expected, tmp_path):
    d = old_config_dir(tmp_path, kind)
    before = (d / "config.json").read_bytes()
    old = json.loads(before)["preprocessing"]
    assert old != expected.to_dict()  # the old spelling really is another one
    config, prep, doc = read_config(d)
    assert prep == expected and prep.window_shape == config.image_shape
    assert doc["preprocessing"] == old  # the document as written ...
    assert (d / "config.json").read_bytes() == before  # ... and the file is never rewritten
    # Rewritten by today's writer, it reads back the same (canonical spellings only).
    write_config(tmp_path / "new", config, prep)
    new = json.loads((tmp_path / "new" / "config.json").read_text())["preprocessing"]
    assert new == prep.to_dict() and migrate(new) == new and read_config(tmp_path / "new")[1] == prep


@pytest.mark.parametrize(
    "section,expected",
    [
        (None, {"name": "original", "normalization": "standardize"}),
        ({"name": "gmic"}, {"name": "original", "normalization": "standardize"}),
        ({"name": "synthetic"}, {"name": "window", "normalization": "standardize"}),
        ({"name": "none"}, {"name": "window", "normalization": "standardize"}),
        ({"name": "cbis_ddsm"}, {"name": "cbis_ddsm", "normalization": "unit_range"}),
        (
            {"name": "original", "normalization": "per_window_standardize", "std_floor": 1e-5},
            {"name": "original", "normalization": "standardize"},
        ),
        ({"name": "window", "normalization": "unit_range"}, {"name": "window", "normalization": "unit_range"}),
    ],
)
def test_migrate_maps_every_old_spelling(section, expected):
    got = migrate(section, image_shape=(64, 48))
    assert got == {**expected, "window_shape": [64, 48]}
    assert Preprocessing.from_dict(got).to_dict()["name"] == expected["name"]


@pytest.mark.parametrize(
    "section,problem",
    [
        ({"name": "unknown"}, "preprocessing name 'unknown'"),
        ({"name": "original", "normalization": "zscore"}, "normalization 'zscore'"),
        ({"name": "original", "std_floor": 1e-3}, "std_floor=0.001 is not supported"),
        ({"name": "original", "crop": 3}, "unknown preprocessing fields ['crop']"),
        ({"name": "original", "synthetic": {"seed": 1}}, "a synthetic section goes with name 'window'"),
        ({"name": "window", "synthetic": {"sigma": 1}}, "unknown synthetic fields ['sigma']"),
        ({"name": "original", "window_shape": [32, 24]}, "window_shape [32, 24] differs from the model's image_shape"),
    ],
)
def test_bad_sections_are_refused_naming_the_file(section, problem, tmp_path):
    config = GMICConfig(image_shape=(64, 48))
    write_config(tmp_path, config, Preprocessing(window_shape=(64, 48)))
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["preprocessing"] = section
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as err:
        read_config(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value) and problem in str(err.value)


def test_a_writer_cannot_record_a_window_the_model_does_not_take(tmp_path):
    with pytest.raises(ValueError, match="differs from the model's image_shape"):
        write_config(tmp_path, GMICConfig(image_shape=(64, 48)), Preprocessing(window_shape=(32, 24)))
    assert not (tmp_path / "config.json").exists()


def test_one_tta_rule_for_predict_evaluate_and_validation(tmp_path, monkeypatch):
    """The training augmentation when the run had one, else the paper's; gmic-jax evaluate --tta
    takes it from the checkpoint's config.json (as predict does)."""
    trained = {
        "enabled": True,
        "flip": False,
        "rotation_deg": 5.0,
        "translation": 0.05,
        "scale": [0.9, 1.1],
        "shear_deg": 0.0,
        "noise_sigma": 0.01,
    }
    assert tta_augment(None) == AugmentConfig() == tta_augment(dict(trained, enabled=False))
    assert tta_augment(trained) == AugmentConfig(False, 5.0, 0.05, (0.9, 1.1), 0.0, 0.01)

    from gmic_jax.models import init_variables
    from gmic_jax.train import evaluate as E

    config = GMICConfig(image_shape=(64, 48), crop_shape=(16, 16), K=1, local_net="resnet18_narrow")
    shapes = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
    save_checkpoint(
        tmp_path / "ckpt",
        config,
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes),
        Preprocessing("window", (64, 48), synthetic=SyntheticData(seed=3, lesion_area=(0.01, 0.02))),
    )
    write_config(tmp_path / "ckpt", config, read_config(tmp_path / "ckpt")[1], train={"augment": trained})
    seen = {}

    def fake_evaluate(model_config, variables, source, mesh, **kw):
        seen.update(kw, spec=source.spec, seed=source.seed)
        return {}, {"labels": np.zeros((1, 2)), "scores": np.zeros((1, 2)), "failures": []}

    monkeypatch.setattr(E, "evaluate", fake_evaluate)
    monkeypatch.setattr(E, "plot_roc_pr", lambda *a, **k: None)
    from gmic_jax.cli import main

    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(tmp_path / "ckpt"),
                "--data",
                "synthetic:num=4",
                "--output",
                str(tmp_path / "out"),
                "--tta",
                "3",
            ]
        )
        == 0
    )
    assert seen["augment"] == tta_augment(trained) and seen["tta_draws"] == 3
    # The synthetic data it was trained on, lesion sizes included, is what it is evaluated on.
    assert seen["spec"].lesion_area == (0.01, 0.02) and seen["seed"] == 3 and seen["spec"].image_shape == (64, 48)


def test_a_730583d_synthetic_run_dir_loads_and_predicts_as_a_new_one(tmp_path):
    """gmic_jax.load_checkpoint and predict --synthetic take a synthetic training workdir of 730583d
    (preprocessing 'synthetic', 'per_window_standardize'): the same numbers as the same weights with
    today's config.json, the recorded lesion sizes included."""
    import gmic_jax
    from gmic_jax import predict as P
    from gmic_jax.models import init_variables

    old = old_config_dir(tmp_path, "train_synthetic")
    config, prep, doc = read_config(old)
    shapes = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    variables["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + 1.0, variables["batch_stats"])
    save_checkpoint(tmp_path / "new", config, variables, prep)  # today's writer
    save_checkpoint(old, config, variables, prep)
    shutil.copyfile(FIXTURES / OLD_CONFIGS["train_synthetic"], old / "config.json")  # the 730583d file back
    loaded_config, loaded = gmic_jax.load_checkpoint(old)
    assert loaded_config == config and jax.tree.structure(loaded) == jax.tree.structure(variables)
    results = [P.predict([d], tmp_path / f"out_{d.name}", synthetic=1, progress=False) for d in (old, tmp_path / "new")]
    assert all(r.ok for r in results) and len(results[0].predictions) == 4
    assert results[0].predictions == results[1].predictions
    assert results[0].localization == results[1].localization
    exams, _ = P.exams_from_synthetic(1, prep)
    assert exams[0].images[0].synthetic[3].lesion_area == (0.002, 0.006)
