"""Datasets: manifest CSV, raw TCIA CBIS-DDSM (fake tree), TFDS CBIS-DDSM (tfds.testing.mock_data)."""

from __future__ import annotations

import numpy as np
import pytest

from gmic_jax.data import batch as batch_lib
from gmic_jax.data import cbis_ddsm, image_to_window
from gmic_jax.data.image import DataError, write_png
from gmic_jax.data.manifest import manifest_source, read_manifest
from gmic_jax.data.sources import assign_validation
from gmic_jax.data.testing import breast_image, corrupt_copy, fake_cbis_ddsm_tree

WINDOW = (64, 48)
HEADER = "path,patient,laterality,view,benign,malignant,split,mask_benign,mask_malignant\n"


def _manifest_folder(tmp_path, rows):
    (tmp_path / "img").mkdir()
    for i, name in enumerate(["a", "b", "c", "d"]):
        write_png(tmp_path / "img" / f"{name}.png", breast_image(96, 64, seed=i, points_right=i % 2 == 0))
    mask = np.zeros((96, 64), np.uint8)
    mask[40:50, 5:15] = 255
    write_png(tmp_path / "img" / "a_mask.png", mask)
    (tmp_path / "data.csv").write_text(HEADER + "".join(rows))
    return tmp_path / "data.csv"


GOOD_ROWS = [
    "img/a.png,p1,L,CC,1,0,train,img/a_mask.png,\n",
    "img/b.png,p1,R,MLO,0,1,val,,\n",
    "img/c.png,p2,L,MLO,0,0,test,,\n",
]


def test_manifest_source_examples(tmp_path):
    csv_path = _manifest_folder(tmp_path, GOOD_ROWS)
    records, errors = read_manifest(csv_path)
    assert errors == [] and [r.split for r in records] == ["train", "val", "test"]
    assert records[0].breast_id == "p1/L" and records[1].view == "R-MLO"
    source = manifest_source(csv_path, window_shape=WINDOW, iterations=3)
    examples = [source[i] for i in range(len(source))]
    batch = batch_lib.stack(examples)
    batch_lib.check_batch(batch, WINDOW)
    np.testing.assert_array_equal(batch["label"], [[1, 0], [0, 1], [0, 0]])
    assert batch["mask"][0, ..., 0].sum() > 0 and batch["mask"][0, ..., 1].sum() == 0
    assert batch["mask"][1:].sum() == 0
    # breast oriented to start at the left edge, whichever side it was stored on
    for img in batch["image"][..., 0]:
        assert img[:, : WINDOW[1] // 4].sum() > img[:, -WINDOW[1] // 4 :].sum()
    assert len(manifest_source(csv_path, split="val", window_shape=WINDOW, iterations=3)) == 1


def test_manifest_mask_follows_image(tmp_path):
    """The mask goes through the same crop, flip and placement as the image."""
    img = breast_image(96, 64, seed=0, points_right=False)
    img[40:50, 50:60] = 60000  # a bright lesion near the right edge (breast against the right edge)
    mask = np.zeros_like(img, dtype=np.uint8)
    mask[40:50, 50:60] = 1
    window, masks = image_to_window.gmic_window(img, "R-CC", masks=[mask, None], window_shape=WINDOW, iterations=3)
    assert masks.shape == WINDOW + (2,)
    np.testing.assert_array_equal(window[masks[..., 0] > 0], 60000)
    assert (window == 60000).sum() == masks[..., 0].sum() == 100


@pytest.mark.parametrize(
    "row,message",
    [
        ("img/d.png,p3,L,,0,0,train,,\n", "missing view"),
        ("img/d.png,p3,X,CC,0,0,train,,\n", "laterality must be L or R"),
        ("img/d.png,p3,L,CC,2,0,train,,\n", "benign must be 0 or 1"),
        ("img/d.png,p3,L,CC,0,0,dev,,\n", "split must be one of"),
        ("img/zz.png,p3,L,CC,0,0,train,,\n", "not found"),
        ("img/d.png,p3,L,CC,0,0,train,,,extra\n", "fields, the header has"),
    ],
)
def test_manifest_bad_rows_reported_rest_kept(tmp_path, row, message):
    csv_path = _manifest_folder(tmp_path, GOOD_ROWS[:2] + [row] + GOOD_ROWS[2:])
    records, errors = read_manifest(csv_path)
    assert len(records) == 3 and len(errors) == 1
    assert "data.csv:4: " in str(errors[0]) and message in str(errors[0])
    with pytest.raises(DataError, match=message):
        manifest_source(csv_path)


def test_manifest_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("path,patient,view\nx.png,p,CC\n")
    records, errors = read_manifest(tmp_path / "m.csv")
    assert records == [] and "missing column(s) laterality, benign, malignant, split" in str(errors[0])


def test_blank_and_corrupt_images_name_the_file(tmp_path):
    csv_path = _manifest_folder(tmp_path, GOOD_ROWS)
    write_png(tmp_path / "img" / "a.png", np.zeros((96, 64), np.uint16))
    corrupt_copy(tmp_path / "img" / "c.png", tmp_path / "img" / "c.png", 0.3)
    source = manifest_source(csv_path, window_shape=WINDOW, iterations=3)
    with pytest.raises(DataError, match=r"a\.png: blank image"):
        source[0]
    with pytest.raises(DataError, match=r"c\.png: corrupt or truncated PNG"):
        source[2]
    assert source[1]["image"].shape == WINDOW + (1,)


CASES = [
    dict(split="Training", kind="Calc", patient="P_00001", side="LEFT", view="CC", pathology="MALIGNANT"),
    dict(split="Training", kind="Calc", patient="P_00001", side="LEFT", view="CC", pathology="BENIGN", abnormality=2),
    dict(
        split="Training", kind="Mass", patient="P_00003", side="RIGHT", view="MLO", pathology="BENIGN_WITHOUT_CALLBACK"
    ),
    dict(split="Test", kind="Mass", patient="P_00002", side="RIGHT", view="CC", pathology="BENIGN"),
]


@pytest.mark.parametrize("layout", ["csv", "nbia"])
def test_tcia_tree(tmp_path, layout):
    fake_cbis_ddsm_tree(tmp_path, CASES, layout=layout)
    records, errors = cbis_ddsm.tcia_records(tmp_path, val_fraction=0.0)
    assert errors == []
    by_id = {r.image_id: r for r in records}
    assert by_id["Calc-Training_P_00001_LEFT_CC"].label == (1.0, 1.0)  # two abnormalities, one image
    assert by_id["Mass-Training_P_00003_RIGHT_MLO"].label == (1.0, 0.0)
    assert by_id["Mass-Test_P_00002_RIGHT_CC"].split == "test"
    source = cbis_ddsm.tcia_source(tmp_path, "train", val_fraction=0.0, window_shape=WINDOW, iterations=3)
    assert len(source) == 2
    for i in range(len(source)):
        ex = source[i]
        assert ex["image"].dtype == np.uint16 and ex["image"].max() > 255  # full 16-bit depth kept
        for c in range(2):  # a mask exactly where the label says there is a lesion of that class
            assert (ex["mask"][..., c].sum() > 0) == bool(ex["label"][c])
    only_calc, _ = cbis_ddsm.tcia_records(tmp_path, kinds=["calc"], val_fraction=0.0)
    assert [r.image_id for r in only_calc] == ["Calc-Training_P_00001_LEFT_CC"]


def test_tcia_missing_file_reported(tmp_path):
    fake_cbis_ddsm_tree(tmp_path, CASES)
    victim = next((tmp_path / "CBIS-DDSM").glob("Mass-Training_P_00003_RIGHT_MLO/*/*/000000.dcm"))
    victim.unlink()
    records, errors = cbis_ddsm.tcia_records(tmp_path, val_fraction=0.0)
    assert len(records) == 2 and len(errors) == 1
    assert "mass_case_description_train_set.csv:2" in str(errors[0]) and "not found" in str(errors[0])
    _, errors = cbis_ddsm.tcia_records(tmp_path / "nowhere")
    assert "no CBIS-DDSM description CSV" in str(errors[0])


def test_seeded_validation_split_by_patient(tmp_path):
    from gmic_jax.data.sources import ImageRecord

    records = [
        ImageRecord(f"i{i}", f"p{i // 2}/L", "L-CC", (0, 0), "train", "x", patient=f"p{i // 2}") for i in range(400)
    ]
    a = assign_validation(records, 0.25, seed=1)
    b = assign_validation(records, 0.25, seed=1)
    c = assign_validation(records, 0.25, seed=2)
    assert [r.split for r in a] == [r.split for r in b] != [r.split for r in c]
    val = {r.patient for r in a if r.split == "val"}
    assert 25 < len(val) < 75  # about a quarter of 200 patients
    assert not val & {r.patient for r in a if r.split == "train"}  # patients never straddle


def test_tfds_example_to_record_labels_and_masks():
    image = np.zeros((10, 8, 1), np.uint8)
    m0 = np.zeros((10, 8, 1), np.uint8)
    m0[1:3, 1:3] = 255
    m1 = np.zeros((5, 4, 1), np.uint8)  # wrong size: resized to the image
    m1[0, 0] = 255
    ex = dict(
        image=image,
        breast=1,
        view=1,
        patient=b"P_1",
        id=b"x",
        abnormalities=dict(pathology=np.array([2, 1]), mask=np.stack([m0, np.zeros_like(m0)])[:, :, :, :]),
    )
    rec = cbis_ddsm.tfds_example_to_record(ex)
    assert rec["label"] == (1.0, 1.0) and (rec["side"], rec["view"]) == ("R", "MLO")
    assert rec["masks"][1].sum() == 4 and rec["masks"][0].sum() == 0
    ex["abnormalities"] = dict(pathology=np.array([0]), mask=[m1])
    rec = cbis_ddsm.tfds_example_to_record(ex)
    assert rec["label"] == (1.0, 0.0) and rec["masks"][0].shape == (10, 8) and rec["masks"][0][:2, :2].all()


def test_tfds_data_source_mocked():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        raw = tfds.data_source("curated_breast_imaging_ddsm/original-mass", split="train")
        train = cbis_ddsm.TfdsSource("original-mass", "train", window_shape=WINDOW, iterations=1, val_fraction=0.3)
        val = cbis_ddsm.TfdsSource("original-mass", "val", window_shape=WINDOW, iterations=1, val_fraction=0.3)
        assert sorted(train.indices + val.indices) == list(range(6))
        read = 0
        for i in range(len(train)):
            tfds_index = train.indices[i]
            try:
                ex = train[i]
            except DataError as e:  # random mock images can be blank after erosion; must name the example
                assert f"[{tfds_index}]" in str(e)
                continue
            batch_lib.check_batch(batch_lib.stack([ex]), WINDOW)
            pathology = np.asarray(raw[tfds_index]["abnormalities"]["pathology"])
            assert tuple(ex["label"]) == (float((pathology != 2).any()), float((pathology == 2).any()))
            assert ex["view"] in ("L-CC", "R-CC", "L-MLO", "R-MLO")
            read += 1
        assert read >= 1
