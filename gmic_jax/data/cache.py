"""A data source preprocessed once into memory-mappable shards of uint16 windows: what `gmic-jax
cache` writes (its command line: :mod:`gmic_jax.data.cache_cli`) and training reads.

Layout of CACHE_DIR: ``images-NNNNN.npy`` (n, H, W) uint16 and, with masks, ``masks-NNNNN.npy``
(n, H, W, 2) uint8 -- plain .npy files, opened with ``np.load(mmap_mode='r')`` -- and
``index.json`` (format, window shape, preprocessing, shards and per-example ids/labels/views),
written last. A cache without ``index.json`` is incomplete: when any example fails, the run
reports every failure, exits 1 and writes ``index.partial.json`` + ``failures.txt`` instead.
:class:`CacheSource` reads a cache as a random-access source of examples (batch layout).

Window noise (``--window-noise``, exam-list sources: images with a best centre). Besides the
plain windows (unchanged), each example keeps its *context*: the region of the flipped crop,
zero-padded for noise, that any draw of the original's window noise can touch
(:func:`gmic_jax.data.window.noise_context`; at most the window plus crop + size noise on each
side). Contexts vary in size, so shards hold them at one fixed shape per cache,
``contexts-NNNNN.npy`` (n, Hc, Wc) uint16 with each context in the upper-left corner and zeros
after, and with masks ``context-masks-NNNNN.npy`` (n, Hc, Wc, 2) uint8 (the exam list's window-frame
masks moved into the context frame: zero outside the plain window). ``index.json`` then has
``window_noise`` = {crop_noise, size_noise, context_shape} and per example ``context`` =
{shape (valid h, w), window (un-noised window's top, left in it), origin (image coordinates of its
[0, 0])}. :meth:`CacheSource.draw` makes one noisy example from it on the host (PIL); a draw
equals :func:`gmic_jax.data.window.noisy_window` on the full crop with the same generator.
Training takes the same draw as :meth:`CacheSource.noisy_region`: the band of the context's rows
that holds the drawn crop, which the device crops and resizes before the training step. Disk: about
(1 + (H + 2m)(W + 2m) / (H W)) times a plain cache (m = crop + size noise; 2.4x at 2944 x 1920).
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from gmic_jax.data import batch as batch_lib
from gmic_jax.data.image import DataError
from gmic_jax.data.sources import ExamListSource
from gmic_jax.data.window import (
    cut_region,
    draw_window,
    noise_borders,
    noise_context,
    noise_region_shape,
    window_noise_amplitudes,
    window_to_context,
)
from gmic_jax.files import FAILURES_TXT, write_atomic, write_failures

FORMAT = "gmic-jax-cache/1"
INDEX_NAME = "index.json"
PARTIAL_INDEX_NAME = "index.partial.json"
WINDOW_NOISE_OPTION = "--window-noise"
# Stream tag of the window-noise generators (apart from other seeded streams of the same seed).
_NOISE_STREAM = 0x6E6F6973


def supports_window_noise(source) -> bool:
    """Whether contexts can be made for ``source``: images with a best centre (exam lists)."""
    return isinstance(source, ExamListSource)


def exam_list_context(source, index: int, crop_noise, size_noise, window_mask=None, pixels=None) -> dict:
    """The window-noise context of image ``index`` of an :class:`~gmic_jax.data.sources.ExamListSource`.

    ``window_mask`` (the example's (H, W, 2) mask in the window frame) is moved into the context
    frame; ``pixels``: the image's ``source.flipped_pixels(index)`` when already read.
    Returns {pixels (h, w) uint16, window (top, left), origin (row, col), masks | None}."""
    item = source.items[index]
    pixels = source.flipped_pixels(index) if pixels is None else pixels
    center = item.best_center
    context, window_at, origin = noise_context(pixels, item.view, center, source.window_shape, crop_noise, size_noise)
    masks = None
    if window_mask is not None:
        masks = window_to_context(
            window_mask, pixels.shape, item.view, center, context.shape, origin, source.window_shape
        )
    # stored values, as the window's (make_example): rounded and clipped to uint16
    context = np.clip(np.rint(context), 0, np.iinfo(batch_lib.IMAGE_DTYPE).max).astype(batch_lib.IMAGE_DTYPE)
    return {"pixels": context, "window": window_at, "origin": origin, "masks": masks}


_WORKER_SOURCE = None
_WORKER_NOISE = None


def _init_worker(source, window_noise=None):
    global _WORKER_SOURCE, _WORKER_NOISE
    _WORKER_SOURCE, _WORKER_NOISE = source, window_noise


def _load_example(i, source=None, window_noise=None):
    """(i, example | DataError, context | None)."""
    if source is None:
        source, window_noise = _WORKER_SOURCE, _WORKER_NOISE
    try:
        if window_noise is None:
            return i, source[i], None
        pixels = source.flipped_pixels(i)  # decoded once for the window and the context
        example = source.example(i, pixels)
        context = exam_list_context(source, i, *window_noise, window_mask=example.get(batch_lib.MASK), pixels=pixels)
        return i, example, context
    except DataError as e:
        return i, e, None
    except Exception as e:  # one bad example must not stop the batch
        return i, DataError(f"example {i}", f"{type(e).__name__}: {e}"), None


def _examples(source, num_workers: int, window_noise=None):
    """(index, example | DataError, context | None) in index order; worker processes get the source once."""
    n = len(source)
    if num_workers <= 1 or n <= 1:
        yield from (_load_example(i, source, window_noise) for i in range(n))
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=context, initializer=_init_worker, initargs=(source, window_noise)
    ) as pool:
        yield from pool.map(_load_example, range(n), chunksize=1)


def build_cache(
    source,
    output_dir,
    shard_size: int = 256,
    num_workers: int = 1,
    metadata: Optional[dict] = None,
    progress: bool = False,
    prior_failures=(),
    window_noise=None,
) -> tuple[int, list[DataError]]:
    """Write every example of ``source`` into ``output_dir``; returns (examples written, failures).

    ``prior_failures`` (e.g. bad manifest rows found before) count as failures of this build.
    ``metadata`` is kept in index.json, with the source's ``preprocessing`` name (and its crop
    ``iterations``) added when it has them.
    ``window_noise``: None (plain windows only), True (also contexts for the original's window
    noise, amplitudes :func:`~gmic_jax.data.window.window_noise_amplitudes` of the source's window)
    or ``((crop_y, crop_x), size)`` amplitudes in pixels; exam-list sources only.
    """
    window_noise = _noise_amplitudes(source, window_noise)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in [INDEX_NAME, PARTIAL_INDEX_NAME, FAILURES_TXT] + [p.name for p in output_dir.glob("*-[0-9]*.npy")]:
        (output_dir / stale).unlink(missing_ok=True)
    failures: list[DataError] = list(prior_failures)
    writer = _ShardWriter(output_dir, shard_size, len(source), window_noise)
    loaded = _examples(source, num_workers, window_noise)
    if progress:
        loaded = tqdm(loaded, total=len(source), desc="cache", unit="image")
    for i, example, context in loaded:
        if isinstance(example, DataError):
            failures.append(example)
            continue
        problem = writer.add(i, example, context)
        if problem is not None:
            failures.append(problem)
    writer.close_shard()
    index = {
        "format": FORMAT,
        "window_shape": list(writer.window_shape or ()),
        "has_masks": bool(writer.has_masks),
        "num_examples": len(writer.examples),
        "shards": writer.shards,
        "examples": writer.examples,
        "metadata": {
            **{k: getattr(source, k) for k in ("preprocessing", "iterations") if hasattr(source, k)},
            **(metadata or {}),
        },
    }
    if window_noise is not None:
        index["window_noise"] = {
            "crop_noise": list(window_noise[0]),
            "size_noise": window_noise[1],
            "context_shape": list(writer.context_shape or ()),
        }
    if failures:
        write_failures(output_dir, failures)
    write_atomic(output_dir / (PARTIAL_INDEX_NAME if failures else INDEX_NAME), json.dumps(index))
    return len(writer.examples), failures


def _noise_amplitudes(source, window_noise):
    """``build_cache``'s ``window_noise`` as ((crop_y, crop_x), size) ints, or None (no contexts)."""
    if window_noise is None or window_noise is False:
        return None
    if not supports_window_noise(source):
        raise ValueError(
            f"window noise needs an exam-list source (images with a best centre); got {type(source).__name__}"
        )
    if window_noise is True:
        window_noise = window_noise_amplitudes(source.window_shape)
    (crop_y, crop_x), size = window_noise
    return (int(crop_y), int(crop_x)), int(size)


class _ShardWriter:
    """The shard files of a cache being built: each example's window (masks, context) goes into the
    open shard, a new one opened (memory-mapped .npy files) when it is full; ``examples`` and
    ``shards`` are what index.json lists. The first example fixes the window shape and whether
    there are masks."""

    def __init__(self, output_dir: Path, shard_size: int, num_examples: int, window_noise):
        self.output_dir, self.shard_size, self.num_examples = output_dir, shard_size, num_examples
        self.window_noise = window_noise
        self.shards: list[dict] = []
        self.examples: list[dict] = []
        self.window_shape = self.has_masks = self.context_shape = None
        self.images = self.masks = self.contexts = self.context_masks = None

    def add(self, index: int, example: dict, context: Optional[dict]) -> Optional[DataError]:
        """Write example ``index`` (with its window-noise ``context``); a DataError when it does not fit."""
        image = example[batch_lib.IMAGE][..., 0]
        if self.window_shape is None:
            self.window_shape, self.has_masks = image.shape, batch_lib.MASK in example
            if self.window_noise is not None:
                (crop_y, crop_x), size = self.window_noise
                self.context_shape = (
                    self.window_shape[0] + 2 * (crop_y + size),
                    self.window_shape[1] + 2 * (crop_x + size),
                )
        if image.shape != self.window_shape:
            return DataError(
                str(example[batch_lib.IMAGE_ID]), f"window {image.shape} differs from the first one {self.window_shape}"
            )
        if self.images is None or self.shards[-1]["count"] == self.shard_size:
            self.close_shard()
            self._open_shard(capacity=min(self.shard_size, self.num_examples - index))
        slot = self.shards[-1]["count"]
        self.images[slot] = image
        if self.has_masks:
            self.masks[slot] = example.get(batch_lib.MASK, np.zeros(self.window_shape + (2,), batch_lib.MASK_DTYPE))
        record = {
            "image_id": str(example[batch_lib.IMAGE_ID]),
            "breast_id": str(example[batch_lib.BREAST_ID]),
            "view": str(example[batch_lib.VIEW]),
            "label": [float(v) for v in example[batch_lib.LABEL]],
        }
        if self.context_shape is not None:
            height, width = context["pixels"].shape
            self.contexts[slot, :height, :width] = context["pixels"]
            if self.has_masks and context["masks"] is not None:
                self.context_masks[slot, :height, :width] = context["masks"]
            record["context"] = {
                "shape": [height, width],
                "window": [int(v) for v in context["window"]],
                "origin": [int(v) for v in context["origin"]],
            }
        self.shards[-1]["count"] += 1
        self.examples.append(record)
        return None

    def _open(self, name: str, dtype, shape: tuple) -> np.ndarray:
        return np.lib.format.open_memmap(self.output_dir / name, mode="w+", dtype=dtype, shape=shape)

    def _open_shard(self, capacity: int) -> None:
        number = len(self.shards)
        shard = {"images": f"images-{number:05d}.npy", "count": 0}
        self.images = self._open(shard["images"], batch_lib.IMAGE_DTYPE, (capacity,) + self.window_shape)
        if self.has_masks:
            shard["masks"] = f"masks-{number:05d}.npy"
            self.masks = self._open(shard["masks"], batch_lib.MASK_DTYPE, (capacity,) + self.window_shape + (2,))
        if self.context_shape is not None:  # fresh files: zeros beyond each context
            shard["contexts"] = f"contexts-{number:05d}.npy"
            self.contexts = self._open(shard["contexts"], batch_lib.IMAGE_DTYPE, (capacity,) + self.context_shape)
            if self.has_masks:
                shard["context_masks"] = f"context-masks-{number:05d}.npy"
                self.context_masks = self._open(
                    shard["context_masks"], batch_lib.MASK_DTYPE, (capacity,) + self.context_shape + (2,)
                )
        self.shards.append(shard)

    def close_shard(self) -> None:
        for array in (self.images, self.masks, self.contexts, self.context_masks):
            if array is not None:
                array.flush()
        self.images = self.masks = self.contexts = self.context_masks = None


def _noise_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The window-noise generator of one draw: fixed by (seed, epoch, example) alone."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _NOISE_STREAM, int(epoch), int(index)]))


class CacheSource:
    """A cache built by :func:`build_cache`, as a random-access source of examples (batch layout).

    Shards are memory-mapped on first use in each process, so the source pickles cheaply to
    Grain's worker processes.
    """

    def __init__(self, cache_dir):
        self.cache_dir = Path(cache_dir)
        index_path = self.cache_dir / INDEX_NAME
        if not index_path.is_file():
            partial = (self.cache_dir / PARTIAL_INDEX_NAME).is_file()
            raise DataError(
                index_path,
                "cache is incomplete (its build reported failures; see failures.txt)"
                if partial
                else "not a gmic-jax cache (no index.json)",
            )
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(index_path, f"unreadable cache index: {e}") from None
        if index.get("format") != FORMAT:
            raise DataError(index_path, f"unknown cache format {index.get('format')!r} (expected {FORMAT})")
        self.index = index
        self.window_shape = tuple(index["window_shape"])
        self.has_masks = index["has_masks"]
        self.examples = index["examples"]
        self._locations = [(s, j) for s, shard in enumerate(index["shards"]) for j in range(shard["count"])]
        self._maps: dict = {}

    @property
    def metadata(self) -> dict:
        return self.index.get("metadata", {})

    def __len__(self) -> int:
        return len(self.examples)

    def _map(self, name: str) -> np.ndarray:
        arr = self._maps.get(name)
        if arr is None:
            try:
                arr = self._maps[name] = np.load(self.cache_dir / name, mmap_mode="r")
            except (OSError, ValueError) as e:  # missing, truncated or not .npy
                raise DataError(self.cache_dir / name, f"unreadable cache shard: {e}") from None
        return arr

    @property
    def window_noise(self) -> Optional[dict]:
        """{crop_noise, size_noise, context_shape} of a cache built with window noise, else None."""
        return self.index.get("window_noise")

    @property
    def has_contexts(self) -> bool:
        return self.window_noise is not None

    def __getitem__(self, index: int) -> dict:
        """The plain window (and masks) of example ``index``: read-only views of the memory-mapped
        shards (batching copies them once; no copy here)."""
        s, j = self._locations[index]
        shard = self.index["shards"][s]
        meta = self.examples[index]
        example = {
            batch_lib.IMAGE: np.asarray(self._map(shard["images"])[j])[..., None],
            batch_lib.LABEL: np.asarray(meta["label"], dtype=batch_lib.LABEL_DTYPE),
            batch_lib.IMAGE_ID: np.str_(meta["image_id"]),
            batch_lib.BREAST_ID: np.str_(meta["breast_id"]),
            batch_lib.VIEW: np.str_(meta["view"]),
        }
        if self.has_masks:
            example[batch_lib.MASK] = np.asarray(self._map(shard["masks"])[j])
        return example

    def draw(self, index: int, rng: np.random.Generator, with_masks: bool = True) -> dict:
        """Example ``index`` with one draw of the window noise from its stored context (``rng``).

        The image is :func:`~gmic_jax.data.window.draw_window`'s float32 window rounded and clipped
        to the batch layout's uint16; masks (``with_masks`` and a cache with masks) are cut at the
        same borders, nearest neighbour. Raises :class:`DataError` for a cache without contexts."""
        noise = self._require_contexts()
        s, j = self._locations[index]
        shard = self.index["shards"][s]
        meta = self.examples[index]
        h, w = meta["context"]["shape"]
        pixels = self._map(shard["contexts"])[j, :h, :w]  # a view: only the drawn crop is read
        masks = self._map(shard["context_masks"])[j, :h, :w] if with_masks and self.has_masks else None
        drawn = draw_window(
            pixels,
            tuple(meta["context"]["window"]),
            self.window_shape,
            rng,
            tuple(noise["crop_noise"]),
            noise["size_noise"],
            masks=masks,
        )
        window, masks = drawn if masks is not None else (drawn, None)
        return batch_lib.make_example(
            window, meta["label"], meta["image_id"], meta["breast_id"], meta["view"], mask=masks
        )

    def noisy_example(self, index: int, epoch: int, seed: int, with_masks: bool = True) -> dict:
        """:meth:`draw` with a generator fixed by (``seed``, ``epoch``, ``index``) alone: the same
        draw in every process, every run and after a resume; another in the next epoch."""
        return self.draw(index, _noise_rng(seed, epoch, index), with_masks)

    @property
    def region_shape(self) -> tuple[int, int]:
        """The fixed shape of :meth:`noisy_region`'s regions: as many rows as the tallest crop a
        draw can make, the stored contexts' width."""
        noise = self._require_contexts()
        return noise_region_shape(self.window_shape, noise["size_noise"])[0], int(noise["context_shape"][1])

    def noisy_region(self, index: int, epoch: int, seed: int) -> dict:
        """The draw of :meth:`noisy_example` (same generator, same borders) as the device path of
        training takes it: {region (:attr:`region_shape`) uint16, the band of the stored context's
        rows that holds the drawn crop, borders
        (4,) int32 of the crop in it, label}. ``gmic_jax.resample.crop_resize(region, borders)``
        on the device makes the window that :meth:`noisy_example` makes with PIL on the host."""
        noise = self._require_contexts()
        s, j = self._locations[index]
        meta = self.examples[index]
        rng = _noise_rng(seed, epoch, index)
        borders = noise_borders(
            meta["context"]["shape"],
            tuple(meta["context"]["window"]),
            self.window_shape,
            rng,
            tuple(noise["crop_noise"]),
            noise["size_noise"],
        )
        stored = self._map(self.index["shards"][s]["contexts"])[j]  # zeros beyond the context
        region, borders = cut_region(stored, borders, self.region_shape[0])
        return {
            batch_lib.REGION: np.asarray(region),
            batch_lib.BORDERS: borders,
            batch_lib.LABEL: np.asarray(meta["label"], dtype=batch_lib.LABEL_DTYPE),
        }

    def _require_contexts(self) -> dict:
        if not self.has_contexts:
            raise DataError(
                self.cache_dir,
                f"this cache holds no window-noise contexts; rebuild it with "
                f"`gmic-jax cache ... {WINDOW_NOISE_OPTION}` (exam-list source)",
            )
        return self.window_noise

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state
