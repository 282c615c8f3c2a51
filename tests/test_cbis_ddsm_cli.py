"""A raw TCIA CBIS-DDSM download to a trained model through the CLI: `gmic-jax cache --source
cbis-tcia` of each split, then `gmic-jax train --config configs/cbis_ddsm.py` on those caches.

The download is a mock built here (gmic_jax.data.testing.fake_cbis_ddsm_tree: tiny 16-bit DICOMs,
ROI-mask and cropped-lesion DICOMs per abnormality, the four description CSVs) in the NBIA Data
Retriever's folder layout. Reading the tree itself is tested in tests/test_data_datasets.py; here
the labels, masks and splits must come out right in the caches, and training must run on them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from gmic_jax.cli import main as cli_main
from gmic_jax.data.cache import CacheSource
from gmic_jax.data.testing import fake_cbis_ddsm_tree

WINDOW = (128, 96)  # the tiny model's image; the mock mammograms (256 x 160) are resized into it
VAL_FRACTION, SEED = 0.2, 0
# With seed 0 the patients below whose seeded position (gmic_jax.data.sources.validation_fraction_of)
# is under 0.2 are P_00001 (0.151), P_00005 (0.140) and P_00008 (0.093): the validation split.
VAL_PATIENTS = {"P_00001", "P_00005", "P_00008"}


def _case(split, kind, patient, side, view, pathology, abnormality=1):
    return dict(
        split=split, kind=kind, patient=patient, side=side, view=view, pathology=pathology, abnormality=abnormality
    )


CASES = [
    _case("Training", "Calc", "P_00001", "LEFT", "CC", "MALIGNANT"),
    _case("Training", "Mass", "P_00005", "RIGHT", "MLO", "BENIGN"),
    _case("Training", "Calc", "P_00008", "LEFT", "MLO", "BENIGN_WITHOUT_CALLBACK"),
    _case("Training", "Calc", "P_00002", "LEFT", "CC", "MALIGNANT"),
    _case("Training", "Calc", "P_00002", "LEFT", "CC", "BENIGN", abnormality=2),  # same image: both classes
    _case("Training", "Mass", "P_00002", "LEFT", "CC", "MALIGNANT"),  # the mass series: another image
    _case("Training", "Mass", "P_00003", "RIGHT", "MLO", "BENIGN_WITHOUT_CALLBACK"),
    _case("Training", "Calc", "P_00004", "RIGHT", "CC", "MALIGNANT"),
    _case("Training", "Calc", "P_00004", "RIGHT", "CC", "MALIGNANT", abnormality=2),  # two masks, one class
    _case("Training", "Mass", "P_00006", "LEFT", "MLO", "BENIGN"),
    _case("Training", "Calc", "P_00007", "RIGHT", "MLO", "MALIGNANT"),
    _case("Test", "Mass", "P_00009", "LEFT", "CC", "MALIGNANT"),
    _case("Test", "Calc", "P_00010", "RIGHT", "CC", "BENIGN"),
]


def expected_images() -> dict[str, dict]:
    """{image id (the CSV path's series folder): split, label, breast, view}, from CASES alone: an
    image is benign / malignant when any of its abnormalities is (BENIGN_WITHOUT_CALLBACK is benign)."""
    images: dict[str, dict] = {}
    for c in CASES:
        image_id = f"{c['kind']}-{c['split']}_{c['patient']}_{c['side']}_{c['view']}"
        split = "test" if c["split"] == "Test" else ("val" if c["patient"] in VAL_PATIENTS else "train")
        e = images.setdefault(
            image_id,
            dict(
                split=split,
                label=[0.0, 0.0],
                breast_id=f"{c['patient']}/{c['side'][0]}",
                view=f"{c['side'][0]}-{c['view']}",
            ),
        )
        e["label"][1 if c["pathology"] == "MALIGNANT" else 0] = 1.0
    return images


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """{split: cache dir} of `gmic-jax cache --source cbis-tcia` on the mock download."""
    tmp = tmp_path_factory.mktemp("cbis")
    root = fake_cbis_ddsm_tree(tmp / "download", CASES, image_shape=(256, 160), layout="nbia")
    out = {}
    for split in ("train", "val", "test"):
        out[split] = tmp / f"cache-{split}"
        assert (
            cli_main(
                [
                    "cache",
                    "--source",
                    "cbis-tcia",
                    "--root",
                    str(root),
                    "--split",
                    split,
                    "--val-fraction",
                    str(VAL_FRACTION),
                    "--seed",
                    str(SEED),
                    "--window-shape",
                    *map(str, WINDOW),
                    "--iterations",
                    "3",
                    "--num-workers",
                    "1",
                    "--no-progress",
                    "--output",
                    str(out[split]),
                ]
            )
            == 0
        )
    return out


def test_caches_hold_each_split_with_labels_from_the_csv_pathology(caches):
    expected = expected_images()
    assert {e["split"] for e in expected.values()} == {"train", "val", "test"}
    for split, cache_dir in caches.items():
        cache = CacheSource(cache_dir)
        assert cache.metadata["split"] == split and cache.metadata["preprocessing"] == "cbis_ddsm"
        assert cache.window_shape == WINDOW and cache.has_masks
        want = {k: v for k, v in expected.items() if v["split"] == split}
        got = {e["image_id"]: e for e in cache.examples}
        assert sorted(got) == sorted(want), split  # every image of the split once, no other
        masks = np.concatenate([np.load(cache_dir / s["masks"]) for s in cache.index["shards"]])
        assert masks.shape == (len(want),) + WINDOW + (2,)
        for i, example in enumerate(cache.examples):
            w = want[example["image_id"]]
            assert example["label"] == w["label"], example["image_id"]
            assert (example["breast_id"], example["view"]) == (w["breast_id"], w["view"])
            # a lesion mask in the window exactly for the classes of the label
            has_mask = [bool(masks[i, ..., c].any()) for c in range(2)]
            assert has_mask == [bool(v) for v in w["label"]], example["image_id"]
            image = cache[i]["image"]
            assert image.shape == WINDOW + (1,) and image.max() > 255  # 16-bit depth kept through the cache


def test_train_on_the_caches_through_the_cli(caches, train_env, tmp_path):
    """configs/cbis_ddsm.py shrunk to a tiny model: 6 training images (all with a finding: one
    balanced epoch is all of them) in batches of 4 -> 1 step per epoch, 2 epochs."""
    workdir = tmp_path / "run"
    args = [
        "--config",
        "configs/cbis_ddsm.py",
        f"--config.data.train_cache={caches['train']}",
        f"--config.data.val_cache={caches['val']}",
        f"--config.model.image_shape={WINDOW}",
        "--config.model.crop_shape=(32, 32)",
        "--config.model.K=2",
        "--config.model.local_net=resnet18_narrow",
        "--config.model.global_blocks=(1, 1, 1, 1, 1)",
        "--config.batch_size=4",
        "--config.num_epochs=2",
        "--config.eval.batch_size=4",
        "--config.checkpoint_every_steps=1",
        "--config.progress_bar=False",
        "--config.log_every_steps=1",
        "--config.augment.enabled=False",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "gmic_jax.cli", "train", *args, "--workdir", str(workdir)],
        cwd=REPO,
        env=train_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [rec for rec in records if "val_auc_malignant" in rec]
    assert [rec["step"] for rec in evaluated] == [1, 2]  # one evaluation per epoch of one step
    for rec in evaluated:  # val holds both classes: its AUCs are defined
        assert np.isfinite([rec["train_loss"], rec["val_auc_malignant"], rec["val_auc_benign"]]).all(), rec
    config = json.loads((workdir / "config.json").read_text())
    assert config["preprocessing"]["name"] == "cbis_ddsm" and config["preprocessing"]["normalization"] == "unit_range"
    assert config["preprocessing"]["window_shape"] == list(WINDOW)

    from gmic_jax import load_checkpoint

    model, variables = load_checkpoint(workdir)
    assert model.image_shape == WINDOW and model.K == 2 and "params" in variables
