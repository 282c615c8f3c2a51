"""Helpers that build small DICOM files, fake CBIS-DDSM trees and window-noise caches, for tests and benchmarks."""

from __future__ import annotations

import csv
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from gmic_jax.data.batch import VIEWS
from gmic_jax.data.cache import build_cache
from gmic_jax.data.exam_list import PREPROCESSING_KEYS, save_exam_list
from gmic_jax.data.image import write_png
from gmic_jax.data.sources import ExamListSource


def write_dicom(
    path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    laterality: Optional[str] = "L",
    view: Optional[str] = "CC",
    window: Optional[tuple] = None,
    voi_lut: Optional[np.ndarray] = None,
    rescale: Optional[tuple] = None,
    padding_value: Optional[int] = None,
    patient_id: str = "P_00001",
    series_uid: Optional[str] = None,
) -> Path:
    """Write a single-frame mammography-like DICOM (explicit VR little endian, uncompressed).

    ``window`` = (center, width); ``voi_lut`` = the LUT's output values (first input value 0,
    entries of ``bits_stored`` bits); ``rescale`` = (slope, intercept).
    """
    import pydicom  # optional (extra "data"/"test"): only the DICOM fixtures need it

    pixels = np.asarray(pixels)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography, for presentation
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.dataset.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = series_uid or pydicom.uid.generate_uid()
    ds.Modality = "MG"
    ds.PatientID = patient_id
    if laterality is not None:
        ds.ImageLaterality = laterality
    if view is not None:
        ds.ViewPosition = view
    ds.set_pixel_data(pixels.astype(np.uint16 if bits_stored > 8 else np.uint8), photometric, bits_stored)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        item = pydicom.dataset.Dataset()
        lut = np.asarray(voi_lut, dtype=np.uint16)
        item.LUTDescriptor = [len(lut), 0, bits_stored]
        item.add_new((0x0028, 0x3006), "US", lut.tolist())  # LUT Data
        ds.VOILUTSequence = pydicom.sequence.Sequence([item])
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if padding_value is not None:
        ds.PixelPaddingValue = int(padding_value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def breast_image(
    height: int, width: int, seed: int = 0, points_right: bool = True, max_value: int = 4095
) -> np.ndarray:
    """A uint16 half-ellipse "breast" against the left (or right) edge, with a thin noise line."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    x0 = 0 if points_right else width - 1
    inside = ((yy - height / 2) / (0.42 * height)) ** 2 + ((xx - x0) / (0.7 * width)) ** 2 < 1
    img = np.where(inside, rng.integers(max_value // 4, max_value + 1, (height, width)), 0)
    img[height // 10, :] = max(1, max_value // 50)  # a thin line that the erosion removes
    return img.astype(np.uint16)


# CBIS-DDSM description CSV columns (as in the TCIA download).
CBIS_COLUMNS = [
    "patient_id",
    "breast density",
    "left or right breast",
    "image view",
    "abnormality id",
    "abnormality type",
    "calc type",
    "calc distribution",
    "assessment",
    "pathology",
    "subtlety",
    "image file path",
    "cropped image file path",
    "ROI mask file path",
]


def _description_row(case: dict, full_rel: str, crop_rel: str, roi_rel: str) -> dict:
    """The row of a CBIS-DDSM description CSV for one case of :func:`fake_cbis_ddsm_tree`."""
    row = {c: "" for c in CBIS_COLUMNS}
    row.update(
        {
            "patient_id": case["patient"],
            "breast density": "2",
            "left or right breast": case["side"],
            "image view": case["view"],
            "abnormality id": str(case.get("abnormality", 1)),
            "abnormality type": "calcification" if case["kind"] == "Calc" else "mass",
            "assessment": "4",
            "pathology": case["pathology"],
            "subtlety": "3",
            "image file path": full_rel,
            "cropped image file path": crop_rel,
            "ROI mask file path": roi_rel,
        }
    )
    return row


def fake_cbis_ddsm_tree(root, cases: Sequence[dict], image_shape=(96, 64), seed: int = 0, layout: str = "csv") -> Path:
    """A tiny TCIA-style CBIS-DDSM download under ``root``.

    Each case: dict(split='Training'|'Test', kind='Calc'|'Mass', patient='P_00001', side='LEFT',
    view='CC', pathology='MALIGNANT'|'BENIGN'|'BENIGN_WITHOUT_CALLBACK', abnormality=1).
    Writes ``CBIS-DDSM/<series folder>/.../1-1.dcm`` for full images and ROI masks, and the four
    ``<kind>_case_description_<split>_set.csv`` files. ``layout`` "csv" puts the DICOMs where the
    CSV paths say; "nbia" uses the NBIA Data Retriever's descriptive folder names instead
    (``<case>/<date>-DDSM-NA-<n>/1.000000-full mammogram images-<n>/1-1.dcm``).
    """
    if layout not in ("csv", "nbia"):
        raise ValueError(f"layout must be 'csv' or 'nbia', got {layout!r}")

    def disk(rel: str, series: str, name: str) -> str:
        if layout == "csv":
            return rel
        case = rel.split("/")[0]
        return f"{case}/07-20-2016-DDSM-NA-{zlib.crc32(case.encode()) % 90000}/1.000000-{series}-{len(case)}/{name}"

    root = Path(root)
    rng = np.random.default_rng(seed)
    rows: dict = {}
    written = set()
    for i, case in enumerate(cases):
        kind, split = case["kind"], case["split"]
        prefix = f"{kind}-{split}_{case['patient']}_{case['side']}_{case['view']}"
        uid = zlib.crc32(prefix.encode())
        full_rel = f"{prefix}/1.3.6.1.4.1.9590.100.1.2.{uid}0/1.3.6.1.4.1.9590.100.1.2.{uid}1/000000.dcm"
        roi_folder = f"{prefix}_{case.get('abnormality', 1)}"
        roi_rel = f"{roi_folder}/1.3.6.1.4.1.9590.100.1.2.{i}2/1.3.6.1.4.1.9590.100.1.2.{i}3/000001.dcm"
        crop_rel = f"{roi_folder}/1.3.6.1.4.1.9590.100.1.2.{i}2/1.3.6.1.4.1.9590.100.1.2.{i}3/000000.dcm"
        h, w = image_shape
        if full_rel not in written:
            image = breast_image(
                h, w, seed=int(rng.integers(1 << 30)), points_right=case["side"] == "LEFT", max_value=65535
            )
            write_dicom(
                root / "CBIS-DDSM" / disk(full_rel, "full mammogram images", "1-1.dcm"),
                image,
                bits_stored=16,
                laterality=None,
                view=None,
                patient_id=prefix,
            )
            written.add(full_rel)
        mask = np.zeros((h, w), dtype=np.uint8)
        r0, c0 = int(rng.integers(h // 3, h // 2)), int(rng.integers(2, w // 4))
        if case["side"] != "LEFT":  # the breast lies against the right edge
            c0 = w - c0 - w // 8
        mask[r0 : r0 + h // 8, c0 : c0 + w // 8] = 255
        write_dicom(
            root / "CBIS-DDSM" / disk(roi_rel, "ROI mask images", "1-2.dcm"),
            mask,
            bits_stored=8,
            laterality=None,
            view=None,
            patient_id=roi_folder,
        )
        write_dicom(
            root / "CBIS-DDSM" / disk(crop_rel, "ROI mask images", "1-1.dcm"),
            mask[:8, :8] + 1,
            bits_stored=8,
            laterality=None,
            view=None,
            patient_id=roi_folder,
        )
        rows.setdefault((kind, split), []).append(_description_row(case, full_rel, crop_rel, roi_rel))
    for (kind, split), kind_rows in rows.items():
        name = f"{kind.lower()}_case_description_{'train' if split == 'Training' else 'test'}_set.csv"
        with open(root / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CBIS_COLUMNS)
            writer.writeheader()
            writer.writerows(kind_rows)
    return root


def write_png_file(path, array) -> Path:
    """Write a uint8/uint16 array as PNG (test convenience; not atomic)."""
    write_png(path, np.asarray(array))
    return Path(path)


def corrupt_copy(src, dst, keep_fraction: float = 0.5) -> Path:
    """Copy the first part of a file only (a truncated download)."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: max(1, int(len(data) * keep_fraction))])
    return dst


__all__ = ["write_dicom", "breast_image", "fake_cbis_ddsm_tree", "write_png_file", "corrupt_copy", "CBIS_COLUMNS"]


def preprocessed_exam(names: dict, centers: dict, left=(0, 1), right=(0, 0)) -> dict:
    """One exam of a preprocessed exam list (the original's pickle layout, what ``gmic-jax
    preprocess`` writes): per view its image name and best centre, the left and right breasts'
    (benign, malignant) labels, not flipped; the other preprocessing keys zero."""
    exam = {
        "horizontal_flip": "NO",
        "best_center": {view: [tuple(int(v) for v in centers[view])] for view in VIEWS},
        "cancer_label": {
            "left_benign": int(left[0]),
            "left_malignant": int(left[1]),
            "right_benign": int(right[0]),
            "right_malignant": int(right[1]),
            "benign": int(left[0] or right[0]),
            "malignant": int(left[1] or right[1]),
            "unknown": 0,
        },
    }
    for key in PREPROCESSING_KEYS[:-1]:
        exam[key] = {view: [0] for view in VIEWS}
    exam.update({view: [names[view]] for view in VIEWS})
    return exam


def window_noise_cache(root, num_exams: int, window, noise=True, seed: int = 0, max_value: int = 4095) -> Path:
    """A small cache with window-noise contexts under ``root``/cache, and what it is built from.

    ``num_exams`` exams of four views: cropped images somewhat smaller and larger than ``window``
    (so that the contexts are zero-padded on some sides), smooth noise with a bright blob each,
    best centres near the middle, in a preprocessed exam list; every other exam malignant and every
    third benign. ``noise``: the cache's window-noise amplitudes (``True``: the original's, scaled
    to ``window``). Returns the cache directory."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    wh, ww = window
    exams = []
    for e in range(num_exams):
        names, centers = {}, {}
        for view in VIEWS:
            h, w = int(rng.integers(0.9 * wh, 1.1 * wh)), int(rng.integers(0.85 * ww, 1.1 * ww))
            coarse = rng.random((h // 8 + 2, w // 8 + 2))
            image = np.kron(coarse, np.ones((8, 8)))[:h, :w] * 0.6 * max_value
            cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
            yy, xx = np.mgrid[:h, :w]
            image += 0.4 * max_value * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.01 * h * w))
            names[view] = f"{e}_{view}"
            write_png(root / "images" / f"{names[view]}.png", np.clip(image, 0, max_value).astype(np.uint16))
            centers[view] = (h // 2 + int(rng.integers(-h // 10, h // 10 + 1)), w // 2)
        exams.append(preprocessed_exam(names, centers, left=(int(e % 3 == 0), e % 2)))
    save_exam_list(root / "exams.pkl", exams)
    source = ExamListSource(root / "exams.pkl", root / "images", window_shape=tuple(window))
    count, failures = build_cache(source, root / "cache", shard_size=max(8, num_exams), window_noise=noise)
    if failures:
        raise RuntimeError(f"window_noise_cache: {failures[0]}")
    return root / "cache"
