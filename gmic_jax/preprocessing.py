"""The preprocessing schema: what turns a stored image into the model's window, as the
``preprocessing`` section of a checkpoint's config.json records it (see :mod:`gmic_jax.checkpoint`).

One frozen dataclass, :class:`Preprocessing`, owns it: ``gmic-jax convert`` and ``gmic-jax train``
write it (:meth:`Preprocessing.to_dict`), training, ``gmic-jax evaluate`` and ``gmic-jax predict``
read it (:meth:`Preprocessing.read`). The canonical spellings, the only ones written::

    name           "original"    the original inference pipeline: crop to the breast (erosion x
                                 ``iterations``, largest component, dilation, ``buffer_size`` px),
                                 flip so the breast points right, best centre, window zero-padded
                                 as the original (gmic_jax.data.image_to_window.gmic_window)
                   "cbis_ddsm"   the paper's CBIS-DDSM preprocessing: largest component, cropped,
                                 oriented, resized to the window (cbis_ddsm_window)
                   "window"      the stored images already are the model's windows (breast against
                                 the left edge, as the synthetic data): nothing but normalisation
    window_shape   [H, W]        the window; equals the model's image_shape
    normalization  "standardize" (x - mean) / max(std, 1e-5) over each window (the original's)
                   "unit_range"  x / max(max(x), 1e-5) over each window (CBIS-DDSM)
    iterations     int           erosion/dilation steps of the crop (original, cbis_ddsm); 100
    buffer_size    int           crop buffer in pixels (original); 50
    synthetic      {"seed", "p_benign", "p_malignant", "lesion_area"}, only for models trained on
                   gmic_jax.data.synthetic (name "window"): the data predict --synthetic and
                   evaluate --data synthetic draw by default

Files written by older versions (up to 730583d) spell some of this differently; :func:`migrate`
maps them, in memory, when a file is read -- the file is never rewritten -- and is the only place
that knows old spellings:

    name "gmic" (cache-trained runs) -> "original"; "synthetic" (synthetic runs), "none" -> "window"
    normalization "per_window_standardize" -> "standardize"; absent -> the name's default
    std_floor (written, never read: always 1e-5) -> dropped; any other value is refused
    no section at all -> "original" at the model's window
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from gmic_jax.config import check_fields
from gmic_jax.data.centers import WINDOW_SHAPE as ORIGINAL_WINDOW
from gmic_jax.data.cropping import BUFFER_SIZE, NUM_ITERATIONS
from gmic_jax.data.synthetic import SyntheticSpec

NAMES = ("original", "cbis_ddsm", "window")
NORMALIZATIONS = ("standardize", "unit_range")
DEFAULT_NORMALIZATION = {"original": "standardize", "cbis_ddsm": "unit_range", "window": "standardize"}
FLOOR = 1e-5  # floor of the window's standard deviation ("standardize") and maximum ("unit_range")

# Old spellings (see the module docstring); read only by `migrate`.
_OLD_NAMES = {"gmic": "original", "synthetic": "window", "none": "window"}
_OLD_NORMALIZATIONS = {"per_window_standardize": "standardize"}


@dataclasses.dataclass(frozen=True)
class SyntheticData:
    """The synthetic data a model was trained on (:class:`gmic_jax.data.synthetic.SyntheticSpec`'s
    drawn settings and the seed)."""

    seed: int = 0
    p_benign: float = 0.35
    p_malignant: float = 0.35
    lesion_area: tuple = (0.002, 0.006)

    def __post_init__(self):
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "p_benign", float(self.p_benign))
        object.__setattr__(self, "p_malignant", float(self.p_malignant))
        object.__setattr__(self, "lesion_area", tuple(float(v) for v in self.lesion_area))
        if len(self.lesion_area) != 2:
            raise ValueError(f"synthetic.lesion_area={list(self.lesion_area)}; expected [low, high]")

    def spec(self, image_shape, **overrides):
        """The :class:`~gmic_jax.data.synthetic.SyntheticSpec` of these settings at ``image_shape``."""
        kw = dict(
            image_shape=tuple(image_shape),
            p_benign=self.p_benign,
            p_malignant=self.p_malignant,
            lesion_area=self.lesion_area,
        )
        kw.update(overrides)
        return SyntheticSpec(**kw)

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "p_benign": self.p_benign,
            "p_malignant": self.p_malignant,
            "lesion_area": list(self.lesion_area),
        }


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What the weights expect as input (the module docstring lists the fields and their values)."""

    name: str = "original"
    window_shape: tuple = ORIGINAL_WINDOW
    normalization: str = "standardize"
    iterations: int = NUM_ITERATIONS
    buffer_size: int = BUFFER_SIZE
    synthetic: Optional[SyntheticData] = None

    def __post_init__(self):
        object.__setattr__(self, "window_shape", tuple(int(v) for v in self.window_shape))
        object.__setattr__(self, "iterations", int(self.iterations))
        object.__setattr__(self, "buffer_size", int(self.buffer_size))
        if self.name not in NAMES:
            raise ValueError(f"preprocessing name {self.name!r}; expected one of {list(NAMES)}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization {self.normalization!r}; expected one of {list(NORMALIZATIONS)}")
        if len(self.window_shape) != 2 or min(self.window_shape) < 1:
            raise ValueError(f"window_shape={list(self.window_shape)}; expected [H, W] >= 1")
        if self.iterations < 0 or self.buffer_size < 0:
            raise ValueError(f"iterations={self.iterations}, buffer_size={self.buffer_size}; expected >= 0")
        if self.synthetic is not None and self.name != "window":
            raise ValueError(
                f"a synthetic section goes with name 'window' (the synthetic images are the windows), not {self.name!r}"
            )

    @classmethod
    def for_name(cls, name: str, window_shape=ORIGINAL_WINDOW, **kw) -> "Preprocessing":
        """``name`` with its default normalisation (unless given in ``kw``)."""
        kw.setdefault("normalization", DEFAULT_NORMALIZATION.get(name, "standardize"))
        return cls(name=name, window_shape=window_shape, **kw)

    def to_dict(self) -> dict:
        """The canonical config.json section."""
        doc: dict[str, Any] = {
            "name": self.name,
            "window_shape": list(self.window_shape),
            "normalization": self.normalization,
            "iterations": self.iterations,
            "buffer_size": self.buffer_size,
        }
        if self.synthetic is not None:
            doc["synthetic"] = self.synthetic.to_dict()
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "Preprocessing":
        """From a canonical section (unknown keys are an error; see :meth:`read` for files)."""
        doc = check_fields(cls, doc, "preprocessing")
        if doc.get("synthetic") is not None:
            if not isinstance(doc["synthetic"], Mapping):
                raise ValueError(f"synthetic must be a mapping, got {doc['synthetic']!r}")
            doc["synthetic"] = SyntheticData(**check_fields(SyntheticData, doc["synthetic"], "synthetic"))
        return cls(**doc)

    @classmethod
    def read(cls, doc: Optional[Mapping[str, Any]], image_shape=None) -> "Preprocessing":
        """A section as read from a file (any version): :func:`migrate`, then :meth:`from_dict`.
        ``image_shape``: the model's, which a written window must equal (and which an old file
        without a window stands for). Raises ValueError saying what is wrong."""
        prep = cls.from_dict(migrate(doc, image_shape))
        if image_shape is not None and prep.window_shape != tuple(image_shape):
            raise ValueError(
                f"preprocessing window_shape {list(prep.window_shape)} differs from the "
                f"model's image_shape {list(image_shape)}"
            )
        return prep


def migrate(doc: Optional[Mapping[str, Any]], image_shape=None) -> dict:
    """A ``preprocessing`` section in any spelling gmic-jax has written -> the canonical one, in
    memory (see the module docstring). The only place old spellings are known."""
    doc = dict(doc) if doc else {"name": "original"}
    if "name" not in doc:
        raise ValueError("preprocessing section has no 'name'")
    doc["name"] = _OLD_NAMES.get(doc["name"], doc["name"])
    if "std_floor" in doc:
        floor = doc.pop("std_floor")
        if float(floor) != FLOOR:
            raise ValueError(f"std_floor={floor} is not supported: the normalisation's floor is {FLOOR}")
    if "normalization" in doc:
        doc["normalization"] = _OLD_NORMALIZATIONS.get(doc["normalization"], doc["normalization"])
    else:
        doc["normalization"] = DEFAULT_NORMALIZATION.get(doc["name"], "standardize")
    if "window_shape" not in doc:
        doc["window_shape"] = list(image_shape or ORIGINAL_WINDOW)
    return doc


def normalize_images(images, kind: str = "standardize"):
    """Raw (N, H, W, 1) images -> float32 model input, per image, on device (jit-able).

    'standardize': (x - mean) / max(std, 1e-5), the original's per-window normalisation;
    'unit_range': x / max(max(x), 1e-5)."""
    import jax.numpy as jnp  # JAX here only: the data path and `gmic-jax cache` read this schema without it

    x = images.astype(jnp.float32)
    if kind == "standardize":
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=(1, 2, 3), keepdims=True))
        return (x - mean) / jnp.maximum(std, FLOOR)
    if kind == "unit_range":
        return x / jnp.maximum(x.max(axis=(1, 2, 3), keepdims=True), FLOOR)
    raise ValueError(f"normalization {kind!r}; expected one of {NORMALIZATIONS}")
