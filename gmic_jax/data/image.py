"""Reading mammograms: 8/12/16-bit grayscale PNG and DICOM, into one in-memory type.

Pixel values are kept as stored (a 12-bit image in a 16-bit PNG stays 0..4095); the only
transforms applied are the ones a DICOM header asks for (modality LUT, VOI LUT or windowing,
MONOCHROME1 inversion, pixel padding), so that every reader returns "brighter = denser" with
the background at the bottom of the value range.

Every failure is a :class:`DataError` that names the file and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from gmic_jax.files import atomic_path


class DataError(ValueError):
    """A problem with one input file (or one record of an input file)."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # pickles across worker processes
        return (type(self), (self.path, self.problem))


@dataclasses.dataclass
class Mammogram:
    """One image in memory.

    pixels: float32 (H, W), values as stored (after the DICOM LUTs, if any).
    view: "CC" or "MLO" (None when the file does not say).
    laterality: "L" or "R" (None when the file does not say).
    path: the file it came from.
    bit_depth: bits of the value range (8 or 16 for PNG; BitsStored or the VOI LUT's bits for DICOM).
    """

    pixels: np.ndarray
    view: Optional[str] = None
    laterality: Optional[str] = None
    path: str = ""
    bit_depth: int = 16

    @property
    def full_view(self) -> Optional[str]:
        """The original's view name, e.g. 'L-CC', or None when view or laterality is unknown."""
        if self.view is None or self.laterality is None:
            return None
        return f"{self.laterality}-{self.view}"

    @property
    def max_value(self) -> int:
        return 2**self.bit_depth - 1

    def to_uint(self) -> np.ndarray:
        """Pixels as the smallest unsigned integer type holding ``bit_depth`` bits (rounded, clipped)."""
        dtype = np.uint8 if self.bit_depth <= 8 else np.uint16
        return np.clip(np.rint(self.pixels), 0, self.max_value).astype(dtype)


# ----------------------------------------------------------------------------------------- PNG

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_png_array(path) -> np.ndarray:
    """A grayscale PNG as its stored integer array (uint8 or uint16), values untouched."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise DataError(path, f"cannot open: {e.strerror or e}") from None
    if head != _PNG_MAGIC:
        raise DataError(path, "not a PNG file (bad signature)")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
                raise DataError(
                    path,
                    f"colour PNG (mode {mode}) is not supported: mammograms are "
                    "grayscale; convert it to 8- or 16-bit grayscale first",
                )
            im.load()
            arr = np.asarray(im)
    except DataError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, zlib.error, ... for broken files
        raise DataError(path, f"corrupt or truncated PNG ({type(e).__name__}: {e})") from None
    if mode == "1":
        arr = arr.astype(np.uint8)
    elif mode.startswith("I;16"):
        arr = arr.astype(np.uint16)  # also normalises big-endian I;16B to native order
    elif mode in ("I", "I;32"):
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(path, f"32-bit PNG values outside 0..65535 (min {arr.min()}, max {arr.max()})")
        arr = arr.astype(np.uint16)
    elif mode != "L":
        raise DataError(path, f"unsupported PNG mode {mode}")
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(path, f"expected a 2-D grayscale image, got shape {arr.shape}")
    return arr


def read_png(path, view: Optional[str] = None, laterality: Optional[str] = None) -> Mammogram:
    """A grayscale PNG (8-bit, or 12/16-bit values in a 16-bit PNG) as a :class:`Mammogram`."""
    arr = read_png_array(path)
    return Mammogram(
        arr.astype(np.float32),
        view=view,
        laterality=laterality,
        path=str(path),
        bit_depth=8 if arr.dtype == np.uint8 else 16,
    )


def write_png(path, array: np.ndarray) -> None:
    """Write a uint8/uint16 2-D array as an 8/16-bit grayscale PNG, atomically (temp file + rename)."""
    array = np.asarray(array)
    if array.dtype not in (np.uint8, np.uint16) or array.ndim != 2:
        raise ValueError(f"write_png wants a 2-D uint8 or uint16 array, got {array.dtype} {array.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG", compress_level=1)


# --------------------------------------------------------------------------------------- DICOM

SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")


def dicom_view(ds) -> Optional[str]:
    """CC / MLO from View Position, else from the View Code Sequence's meaning."""
    value = str(getattr(ds, "ViewPosition", "") or "").strip().upper()
    if value in ("CC", "MLO"):
        return value
    if value in ("XCC", "XCCL", "XCCM"):  # exaggerated CC views are CC for the model
        return "CC"
    for item in getattr(ds, "ViewCodeSequence", []) or []:
        meaning = str(getattr(item, "CodeMeaning", "")).lower()
        if "cranio-caudal" in meaning or "craniocaudal" in meaning:
            return "CC"
        if "oblique" in meaning:
            return "MLO"
    return None


def dicom_laterality(ds) -> Optional[str]:
    for key in ("ImageLaterality", "Laterality"):
        value = str(getattr(ds, key, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    return None


def _output_range(ds, used_voi_lut_sequence: bool) -> tuple[float, float, int]:
    """(low, high, bits) of the values after the modality and VOI transforms."""
    if used_voi_lut_sequence:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1), bits
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1), bits
    # Windowing (and no VOI at all) keep the stored range, mapped through the rescale.
    bits = int(ds.BitsStored)
    if int(getattr(ds, "PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope = float(ds.RescaleSlope) if "RescaleSlope" in ds else 1.0
    intercept = float(ds.RescaleIntercept) if "RescaleIntercept" in ds else 0.0
    low, high = sorted((low * slope + intercept, high * slope + intercept))
    return low, high, bits


def _padding_mask(ds, raw: np.ndarray) -> Optional[np.ndarray]:
    """Pixels that the header marks as padding (Pixel Padding Value [and Range Limit])."""
    if "PixelPaddingValue" not in ds:
        return None
    value = int(ds.PixelPaddingValue)
    if "PixelPaddingRangeLimit" in ds:
        limit = int(ds.PixelPaddingRangeLimit)
        low, high = min(value, limit), max(value, limit)
        return (raw >= low) & (raw <= high)
    return raw == value


def read_dicom(path, apply_voi: bool = True) -> Mammogram:
    """A DICOM mammogram as a :class:`Mammogram`.

    Applies, as the header says: the modality LUT (rescale), the VOI LUT or window (when
    ``apply_voi``), MONOCHROME1 inversion (so that dense tissue is bright), and pixel padding
    (padding pixels become the bottom of the value range, i.e. background). View and laterality
    come from View Position / View Code Sequence and Image Laterality / Laterality.
    """
    import pydicom  # optional (extra "data"): only DICOM input needs it

    path = str(path)
    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError as e:
        raise DataError(path, f"not a DICOM file ({e})") from None
    except Exception as e:
        raise DataError(path, f"corrupt or truncated DICOM ({type(e).__name__}: {e})") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip()
    if not photometric:
        raise DataError(path, "DICOM has no Photometric Interpretation (0028,0004)")
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise DataError(
            path,
            f"unsupported photometric interpretation {photometric!r} (supported: {', '.join(SUPPORTED_PHOTOMETRIC)})",
        )
    if "PixelData" not in ds:
        raise DataError(path, "DICOM has no pixel data")
    try:
        raw = ds.pixel_array
    except Exception as e:
        raise DataError(path, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from None
    if raw.ndim != 2:
        raise DataError(path, f"expected one 2-D frame, got pixel array of shape {raw.shape}")
    try:
        values = pydicom.pixels.apply_modality_lut(raw, ds)
        used_lut = bool(apply_voi and ds.get("VOILUTSequence"))
        if apply_voi:
            values = pydicom.pixels.apply_voi_lut(values, ds, prefer_lut=True)
    except Exception as e:
        raise DataError(path, f"cannot apply the header's LUT/window ({type(e).__name__}: {e})") from None
    low, high, bits = _output_range(ds, used_lut)
    values = np.asarray(values, dtype=np.float64)
    if photometric == "MONOCHROME1":
        values = (high + low) - values
    padding = _padding_mask(ds, raw)
    if padding is not None:
        values[padding] = low
    return Mammogram(
        values.astype(np.float32), view=dicom_view(ds), laterality=dicom_laterality(ds), path=path, bit_depth=bits
    )


def is_dicom_path(path) -> bool:
    suffix = Path(path).suffix.lower()
    if suffix in (".dcm", ".dicom"):
        return True
    if suffix == ".png":
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path, view: Optional[str] = None, laterality: Optional[str] = None) -> Mammogram:
    """PNG or DICOM, chosen by the file's suffix (or its DICOM preamble).

    ``view`` / ``laterality`` given here override what a DICOM header says (and fill them in for PNG).
    """
    path = str(path)
    if not os.path.exists(path):
        raise DataError(path, "file not found")
    if is_dicom_path(path):
        image = read_dicom(path)
        if view is not None:
            image.view = view
        if laterality is not None:
            image.laterality = laterality
        return image
    return read_png(path, view=view, laterality=laterality)
