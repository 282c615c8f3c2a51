"""Manifest CSV: any folder of images plus one CSV is a dataset.

Columns: ``path, patient, laterality, view, benign, malignant, split`` and optionally
``mask_benign, mask_malignant``. Paths are relative to the CSV's folder (absolute paths work too);
``laterality`` is L/R, ``view`` CC/MLO, ``benign``/``malignant`` 0/1, ``split`` train/val/test.
Images are PNG or DICOM; masks (PNG or DICOM, same size as their image, non-zero = lesion; an
empty cell = no lesion of that class) follow the image through the preprocessing. The stored
orientation of each image is read off the image itself.

Example::

    path,patient,laterality,view,benign,malignant,split,mask_benign,mask_malignant
    img/p1_L_CC.png,p1,L,CC,1,0,train,masks/p1_L_CC_b.png,
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional

from gmic_jax.data.image import DataError
from gmic_jax.data.sources import SPLITS, ImageRecord, RecordSource

REQUIRED_COLUMNS = ("path", "patient", "laterality", "view", "benign", "malignant", "split")
OPTIONAL_COLUMNS = ("mask_benign", "mask_malignant")


def _flag(value: str, column: str) -> float:
    value = value.strip()
    if value not in ("0", "1", "0.0", "1.0"):
        raise ValueError(f"{column} must be 0 or 1, got {value!r}")
    return float(value)


def read_manifest(csv_path, check_files: bool = True) -> tuple[list[ImageRecord], list[DataError]]:
    """All valid rows as records, and one :class:`DataError` per bad row (or for the whole file).

    A file-level problem (unreadable, not CSV, missing columns) gives no records and one error.
    """
    csv_path = Path(csv_path)
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        return [], [DataError(csv_path, f"cannot read manifest: {e}")]
    try:
        reader = csv.DictReader(text.splitlines())
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = list(reader)
    except csv.Error as e:
        return [], [DataError(csv_path, f"malformed CSV: {e}")]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        return [], [
            DataError(
                csv_path,
                f"malformed manifest: missing column(s) {', '.join(missing)} (header: {', '.join(header) or 'empty'})",
            )
        ]
    records, errors, seen = [], [], set()
    for line, raw in enumerate(rows, start=2):
        try:
            record = _row_record(raw, header, base, check_files)
            if record.image_id in seen:
                raise ValueError(f"image {record.image_id} listed twice")
            seen.add(record.image_id)
        except ValueError as e:
            errors.append(DataError(f"{csv_path}:{line}", str(e)))
            continue
        records.append(record)
    return records, errors


def _row_record(raw: dict, header: list, base: Path, check_files: bool) -> ImageRecord:
    """The record of one manifest row; ValueError says what is wrong with it."""
    row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None and isinstance(v, (str, type(None)))}
    if None in raw:
        raise ValueError(f"{len(header) + len(raw[None])} fields, the header has {len(header)}")
    path = row["path"]
    if not path:
        raise ValueError("empty path")
    laterality = row["laterality"].upper()
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be L or R, got {row['laterality']!r}")
    view = row["view"].upper()
    if not view:
        raise ValueError("missing view")
    if view not in ("CC", "MLO"):
        raise ValueError(f"view must be CC or MLO, got {row['view']!r}")
    split = row["split"].lower()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {row['split']!r}")
    if not row["patient"]:
        raise ValueError("empty patient")
    label = (_flag(row["benign"], "benign"), _flag(row["malignant"], "malignant"))
    full_path = str(base / path)
    if check_files and not os.path.isfile(full_path):
        raise ValueError(f"image {full_path} not found")
    masks = []
    for column in OPTIONAL_COLUMNS:
        value = row.get(column, "")
        if value:
            mask_path = str(base / value)
            if check_files and not os.path.isfile(mask_path):
                raise ValueError(f"{column} {mask_path} not found")
            masks.append((mask_path,))
        else:
            masks.append(())
    patient = row["patient"]
    return ImageRecord(
        image_id=path,
        breast_id=f"{patient}/{laterality}",
        view=f"{laterality}-{view}",
        label=label,
        split=split,
        path=full_path,
        mask_paths=tuple(masks),
        patient=patient,
    )


def manifest_source(csv_path, split: Optional[str] = None, strict: bool = True, **source_kwargs) -> RecordSource:
    """A :class:`RecordSource` over the manifest's rows (of one ``split``, or all).

    ``strict`` raises the first bad row's error; otherwise bad rows are left out.
    """
    records, errors = read_manifest(csv_path)
    if errors and strict:
        raise errors[0]
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        records = [r for r in records if r.split == split]
    return RecordSource(records, **source_kwargs)
