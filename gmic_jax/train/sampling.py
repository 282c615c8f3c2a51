"""Data sources for training and the per-epoch order of examples (balanced sampling)."""

from __future__ import annotations

import numpy as np

from gmic_jax.data.cache import WINDOW_NOISE_OPTION, CacheSource
from gmic_jax.data.image import DataError
from gmic_jax.data.synthetic import SyntheticLesions, SyntheticSpec
from gmic_jax.preprocessing import Preprocessing, SyntheticData

SOURCES = ("synthetic", "cache")


def make_sources(data_cfg):
    """(train source, validation source, :class:`~gmic_jax.preprocessing.Preprocessing` for
    config.json) from ``config.data``.

    With ``data.window_noise`` the train source is a cache with window-noise contexts (training
    then takes :meth:`~gmic_jax.data.cache.CacheSource.noisy_example` draws; validation stays plain).
    """
    window_noise = bool(data_cfg.get("window_noise", False))
    if window_noise and data_cfg.source != "cache":
        raise ValueError(
            f"data.window_noise=True needs data.source='cache' (a cache built with "
            f"`gmic-jax cache --source exam-list ... --window-noise`), got data.source="
            f"{data_cfg.source!r}; set data.window_noise=False"
        )
    if data_cfg.source == "synthetic":
        spec = SyntheticSpec(
            image_shape=tuple(data_cfg.image_shape),
            p_benign=data_cfg.p_benign,
            p_malignant=data_cfg.p_malignant,
            lesion_area=tuple(data_cfg.lesion_area),
        )
        train = SyntheticLesions(data_cfg.num_train, seed=data_cfg.seed, split="train", spec=spec, with_masks=False)
        val = SyntheticLesions(data_cfg.num_val, seed=data_cfg.seed, split="val", spec=spec, with_masks=True)
        prep = Preprocessing(
            "window",
            spec.image_shape,
            data_cfg.normalization,
            synthetic=SyntheticData(data_cfg.seed, spec.p_benign, spec.p_malignant, spec.lesion_area),
        )
        return train, val, prep
    if data_cfg.source == "cache":
        if not data_cfg.train_cache or not data_cfg.val_cache:
            raise ValueError("data.source='cache' needs data.train_cache and data.val_cache (gmic-jax cache outputs)")
        train, val = CacheSource(data_cfg.train_cache), CacheSource(data_cfg.val_cache)
        if window_noise and not train.has_contexts:
            raise DataError(
                train.cache_dir,
                f"data.window_noise=True but this train cache has no window-noise "
                f"contexts; rebuild it with `gmic-jax cache --source exam-list ... "
                f"{WINDOW_NOISE_OPTION}` or set data.window_noise=False",
            )
        return train, val, cache_preprocessing(train, data_cfg.normalization)
    raise ValueError(f"data.source={data_cfg.source!r}; expected one of {SOURCES}")


def cache_preprocessing(cache, normalization: str) -> Preprocessing:
    """The preprocessing a cache's windows went through (its index.json, any version) with the
    training's normalisation."""
    meta = cache.metadata
    try:
        return Preprocessing.read(
            {
                "name": meta.get("preprocessing", "original"),
                "window_shape": cache.window_shape,
                "normalization": normalization,
                **({"iterations": meta["iterations"]} if "iterations" in meta else {}),
            }
        )
    except ValueError as e:
        raise DataError(cache.cache_dir / "index.json", f"metadata: {e}") from None


def source_labels(source) -> np.ndarray:
    """(N, 2) labels of a source, without decoding images where the source knows them."""
    labels = getattr(source, "labels", None)
    if labels is not None:
        return np.asarray(labels, np.float32)
    examples = getattr(source, "examples", None)  # CacheSource's index
    if examples is not None:
        return np.asarray([e["label"] for e in examples], np.float32)
    return np.stack([source[i]["label"] for i in range(len(source))]).astype(np.float32)


def epoch_order(labels: np.ndarray, epoch: int, seed: int, balanced: bool) -> np.ndarray:
    """The examples of ``epoch`` in order, the same in every process and every run.

    Balanced: every positive (any finding) and as many negatives drawn at random (all of them when
    there are fewer), shuffled; otherwise every example, shuffled."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919, epoch]))
    n = len(labels)
    if balanced:
        positive = np.flatnonzero(labels.max(axis=1) > 0)
        negative = np.flatnonzero(labels.max(axis=1) == 0)
        take = min(len(positive), len(negative))
        chosen = np.concatenate([positive, rng.choice(negative, size=take, replace=False)])
    else:
        chosen = np.arange(n)
    return rng.permutation(chosen)


def steps_per_epoch(labels: np.ndarray, batch_size: int, balanced: bool) -> int:
    n = len(epoch_order(labels, 0, 0, balanced))
    steps = n // batch_size
    if steps < 1:
        raise ValueError(f"an epoch has {n} examples, fewer than one batch of {batch_size}")
    return steps
