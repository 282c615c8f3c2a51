"""CBIS-DDSM, two ways in. Both give image-level [benign, malignant] labels (any abnormality of
that pathology; BENIGN_WITHOUT_CALLBACK counts as benign), lesion masks (union per class), the
official train/test split and a seeded, patient-grouped train/validation split.

1. :func:`tcia_records` / :func:`tcia_source` -- the raw TCIA download, no TensorFlow: the four
   ``{calc,mass}_case_description_{train,test}_set.csv`` files and the DICOM tree, at full bit
   depth. Two on-disk layouts are found:

   - "csv": the files sit where the CSV's ``image file path`` says, under ``ROOT/CBIS-DDSM/`` or
     ``ROOT/`` (``Calc-Training_P_00005_RIGHT_CC/1.3.6.../1.3.6.../000000.dcm``);
   - "nbia": the NBIA Data Retriever's descriptive folders
     (``CBIS-DDSM/Calc-Training_P_00005_RIGHT_CC/<date>-DDSM-NA-<n>/1.000000-full mammogram
     images-<n>/1-1.dcm``): the case folder (first part of the CSV path) is searched for DICOMs;
     in an ROI folder the mask is the DICOM as large as the full image (the other one is the
     cropped lesion), since the CSV's 000000/000001 names are known to be swapped for some cases.

2. :func:`tfds_source` -- ``tensorflow-datasets``' ``curated_breast_imaging_ddsm`` configs
   ``original-calc`` / ``original-mass`` read with ``tfds.data_source`` (array_record; reading needs
   no TensorFlow, preparing the dataset does). Note that TFDS stores 8-bit PNGs.

Both apply a named preprocessing (default: the paper's ``"cbis_ddsm"``; see
:mod:`gmic_jax.data.image_to_window`).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from gmic_jax.data import batch as batch_lib
from gmic_jax.data import cropping
from gmic_jax.data.centers import WINDOW_SHAPE
from gmic_jax.data.image import DataError, read_image
from gmic_jax.data.image_to_window import resize, to_window
from gmic_jax.data.sources import SPLITS, ImageRecord, RecordSource, assign_validation, validation_fraction_of

KINDS = ("calc", "mass")
PATHOLOGY_MALIGNANT = "MALIGNANT"
PATHOLOGY_BENIGN = ("BENIGN", "BENIGN_WITHOUT_CALLBACK")
TFDS_NAME = "curated_breast_imaging_ddsm"
TFDS_CONFIGS = ("original-calc", "original-mass")


def _csv_name(kind: str, official_split: str) -> str:
    return f"{kind}_case_description_{official_split}_set.csv"


class _DicomFinder:
    """Finds the DICOM files of a CSV path in either layout (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = root
        self.bases = [b for b in (root / "CBIS-DDSM", root) if b.is_dir()]
        self._folders: Optional[dict] = None

    def _index(self) -> dict:
        if self._folders is None:
            folders = {}
            for base in self.bases:
                for entry in os.scandir(base):
                    if entry.is_dir() and entry.name not in folders:
                        folders[entry.name] = entry.path
            self._folders = folders
        return self._folders

    def candidates(self, csv_path: str) -> list[str]:
        rel = csv_path.strip().replace("\\", "/")
        for base in self.bases:
            p = base / rel
            if p.is_file():
                return [str(p)]
        folder = self._index().get(rel.split("/")[0])
        if folder is None:
            return []
        found = []
        for dirpath, _, files in os.walk(folder):
            found.extend(os.path.join(dirpath, f) for f in files if f.lower().endswith(".dcm"))
        return sorted(found)


def _dicom_size(path: str) -> tuple:
    import pydicom  # optional (extra "data"): only the TCIA download needs it

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns)
    except Exception as e:
        raise DataError(path, f"cannot read DICOM header ({type(e).__name__}: {e})") from None


def tcia_records(
    root,
    kinds: Iterable[str] = KINDS,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[ImageRecord], list[DataError]]:
    """Image records of a raw TCIA CBIS-DDSM download, and the problems found (missing files...).

    Splits: official Training -> 'train' (a seeded ``val_fraction`` of its patients -> 'val'),
    official Test -> 'test'. A record's ``mask_paths`` hold the ROI-mask *candidates* (resolved to
    the real mask when loaded, see :class:`TciaSource`).
    """
    root = Path(root)
    finder = _DicomFinder(root)
    images: dict = {}  # full image's DICOM -> what the description CSVs say of it
    errors: list[DataError] = []
    found_csv = False
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kind must be in {KINDS}, got {kind!r}")
        for official, split in (("train", "train"), ("test", "test")):
            csv_path = root / _csv_name(kind, official)
            if not csv_path.is_file():
                continue
            found_csv = True
            try:
                with open(csv_path, newline="", encoding="utf-8-sig") as f:
                    rows = list(csv.DictReader(f))
            except (OSError, csv.Error, UnicodeDecodeError) as e:
                errors.append(DataError(csv_path, f"cannot read description CSV: {e}"))
                continue
            for line, row in enumerate(rows, start=2):
                problem = _add_description_row(row, split, finder, images)
                if problem is not None:
                    errors.append(DataError(f"{csv_path}:{line}", problem))
    if not found_csv:
        errors.append(
            DataError(root, f"no CBIS-DDSM description CSV found (expected e.g. {_csv_name('calc', 'train')})")
        )
    records = [
        ImageRecord(
            image_id=e["image_id"],
            breast_id=f"{e['patient']}/{e['side']}",
            view=f"{e['side']}-{e['view']}",
            label=(e["benign"], e["malignant"]),
            split=e["split"],
            path=path,
            mask_paths=(tuple(e["masks"][0]), tuple(e["masks"][1])),
            patient=e["patient"],
        )
        for path, e in sorted(images.items())
    ]
    return assign_validation(records, val_fraction, seed), errors


def _add_description_row(row: dict, split: str, finder: _DicomFinder, images: dict):
    """Add one row of a description CSV to ``images`` (full image's DICOM -> its entry); returns
    what is wrong with the row, else None."""
    try:
        patient = row["patient_id"].strip()
        side = row["left or right breast"].strip().upper()
        view = row["image view"].strip().upper()
        pathology = row["pathology"].strip().upper()
        image_rel = row["image file path"].strip()
        roi_rel = row["ROI mask file path"].strip()
    except (KeyError, AttributeError) as e:
        return f"malformed description CSV: missing column {e}"
    if side not in ("LEFT", "RIGHT") or view not in ("CC", "MLO"):
        return f"bad side/view {side!r}/{view!r}"
    if pathology != PATHOLOGY_MALIGNANT and pathology not in PATHOLOGY_BENIGN:
        return f"unknown pathology {pathology!r}"
    image_files = finder.candidates(image_rel)
    if len(image_files) != 1:
        return f"full image {image_rel!r}: {'not found' if not image_files else 'several DICOMs'}"
    entry = images.setdefault(
        image_files[0],
        dict(
            patient=patient,
            side=side[0],
            view=view,
            split=split,
            benign=0.0,
            malignant=0.0,
            masks=([], []),
            image_id=image_rel.split("/")[0],
        ),
    )
    cls = 1 if pathology == PATHOLOGY_MALIGNANT else 0
    entry["malignant" if cls else "benign"] = 1.0
    roi_files = tuple(finder.candidates(roi_rel))
    if not roi_files:
        return f"ROI mask {roi_rel!r} not found"
    entry["masks"][cls].append(roi_files)
    return None


def resolve_roi_mask(candidates: tuple, image_shape: tuple) -> str:
    """The ROI mask among an ROI folder's DICOMs: the one as large as the full image."""
    if len(candidates) == 1:
        return candidates[0]
    sizes = [(_dicom_size(c), c) for c in candidates]
    same = [c for size, c in sizes if size == tuple(image_shape)]
    if same:
        return same[0]
    return max(sizes, key=lambda s: s[0][0] * s[0][1])[1]


class TciaSource(RecordSource):
    """A :class:`RecordSource` whose mask entries are ROI-folder candidates, resolved on load."""

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = read_image(record.path)
        pixels = image.to_uint().astype(np.uint16)
        masks = None
        if self.with_masks:
            masks = []
            for groups in record.mask_paths:
                union = None
                for candidates in groups:
                    mask = read_image(resolve_roi_mask(candidates, pixels.shape)).pixels > 0
                    union = mask if union is None or union.shape != mask.shape else union | mask
                masks.append(union)
        return self.make_example(record, pixels, masks)


def tcia_source(
    root,
    split: str,
    kinds: Iterable[str] = KINDS,
    val_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = False,
    preprocessing: str = "cbis_ddsm",
    **source_kwargs,
) -> TciaSource:
    """The images of one split of a raw TCIA download; ``strict`` raises on the first problem."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    records, errors = tcia_records(root, kinds, val_fraction, seed)
    if errors and (strict or not records):
        raise errors[0]
    return TciaSource([r for r in records if r.split == split], preprocessing=preprocessing, **source_kwargs)


# ------------------------------------------------------------------------------------------ TFDS


def tfds_example_to_record(example: dict) -> dict:
    """Labels and masks of one ``original-calc`` / ``original-mass`` example (numpy, as read by
    ``tfds.data_source``): dict(image (H, W) uint8, label (2,), masks [benign, malignant] bool | None,
    patient, side 'L'/'R', view 'CC'/'MLO', image_id)."""
    image = np.asarray(example["image"])
    image = image[..., 0] if image.ndim == 3 else image
    abn = example.get("abnormalities", {})
    pathology = np.asarray(abn.get("pathology", []), dtype=np.int64).reshape(-1)
    masks_in = abn.get("mask", [])
    # ClassLabel names: BENIGN=0, BENIGN_WITHOUT_CALLBACK=1, MALIGNANT=2.
    malignant = pathology == 2
    label = (float((~malignant).any()), float(malignant.any()))
    masks: list = [None, None]
    for i, cls in enumerate(malignant.astype(int)):
        if i >= len(masks_in):
            break
        mask = np.asarray(masks_in[i])
        mask = (mask[..., 0] if mask.ndim == 3 else mask) > 0
        if mask.shape != image.shape:  # a few CBIS-DDSM masks are not the size of their image
            mask = resize(mask.astype(np.uint8), image.shape, nearest=True) > 0
        masks[cls] = mask if masks[cls] is None else masks[cls] | mask
    side = "L" if int(example["breast"]) == 0 else "R"  # ClassLabel LEFT=0, RIGHT=1
    view = "CC" if int(example["view"]) == 0 else "MLO"  # ClassLabel CC=0, MLO=1
    patient = example.get("patient", b"")
    patient = patient.decode() if isinstance(patient, bytes) else str(patient)
    image_id = example.get("id", b"")
    image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
    return dict(image=image, label=label, masks=masks, patient=patient, side=side, view=view, image_id=image_id)


class TfdsSource:
    """``tfds.data_source('curated_breast_imaging_ddsm/<config>')`` as examples.

    ``split`` 'train' / 'val' come from TFDS's train split (patients assigned by
    :func:`gmic_jax.data.sources.validation_fraction_of`; the first access reads every train example
    once to learn its patient), 'test' is TFDS's test split.
    """

    def __init__(
        self,
        config: str = "original-calc",
        split: str = "train",
        data_dir: Optional[str] = None,
        preprocessing: str = "cbis_ddsm",
        window_shape=WINDOW_SHAPE,
        with_masks: bool = True,
        val_fraction: float = 0.1,
        seed: int = 0,
        iterations: int = cropping.NUM_ITERATIONS,
    ):
        import tensorflow_datasets as tfds  # optional (extra "data"): only --source cbis-tfds needs it

        if config not in TFDS_CONFIGS:
            raise ValueError(f"config must be one of {TFDS_CONFIGS}, got {config!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        try:
            self.source = tfds.data_source(
                f"{TFDS_NAME}/{config}", split="test" if split == "test" else "train", data_dir=data_dir, download=False
            )
        except (KeyError, FileNotFoundError, AssertionError) as e:  # what TFDS raises for a dataset not built
            where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
            raise DataError(
                where,
                f"TFDS dataset {TFDS_NAME}/{config} is not prepared here (TFDS needs its manual "
                f"download built first, or use --source cbis-tcia): {e}",
            ) from None
        self.split = split
        self.preprocessing = preprocessing
        self.window_shape = tuple(window_shape)
        self.with_masks = with_masks
        self.iterations = iterations
        if split == "test":
            self.indices = list(range(len(self.source)))
        else:
            self.indices = []
            for i in range(len(self.source)):
                patient = tfds_example_to_record(self.source[i])["patient"]
                in_val = validation_fraction_of(patient, seed) < val_fraction
                if in_val == (split == "val"):
                    self.indices.append(i)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        tfds_index = self.indices[index]
        rec = tfds_example_to_record(self.source[tfds_index])
        full_view = f"{rec['side']}-{rec['view']}"
        masks = rec["masks"] if self.with_masks else None
        window, mask_window = to_window(
            self.preprocessing,
            rec["image"].astype(np.uint16),
            full_view,
            masks=masks,
            window_shape=self.window_shape,
            iterations=self.iterations,
            path=f"{TFDS_NAME}[{tfds_index}] {rec['image_id']}",
        )
        image_id = rec["image_id"] or f"{TFDS_NAME}/{tfds_index}"
        return batch_lib.make_example(
            window, rec["label"], image_id, f"{rec['patient']}/{rec['side']}", full_view, mask=mask_window
        )


def tfds_source(config: str = "original-calc", split: str = "train", **kwargs) -> TfdsSource:
    return TfdsSource(config=config, split=split, **kwargs)
