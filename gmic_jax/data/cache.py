"""`gmic-jax cache`: preprocess a data source once into memory-mappable shards of uint16 windows.

    gmic-jax cache --output CACHE_DIR --source manifest --manifest data.csv --split train
    gmic-jax cache --output CACHE_DIR --source exam-list --exam-list OUT/exam_list.pkl \
        --images OUT/cropped_images [--segmentations SEG_DIR] [--window-noise]
    gmic-jax cache --output CACHE_DIR --source cbis-tcia --root CBIS_ROOT --split train [--kinds calc mass]
    gmic-jax cache --output CACHE_DIR --source cbis-tfds --tfds-config original-calc --split train

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

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from gmic_jax.data import batch as batch_lib
from gmic_jax.data.image import DataError
from gmic_jax.data.transforms import PREPROCESSINGS
from gmic_jax.data.window import (
    cut_region,
    draw_window,
    noise_borders,
    noise_context,
    noise_region_shape,
    window_noise_amplitudes,
    window_to_context,
)
from gmic_jax.files import FAILURES_TXT as FAILURES_NAME
from gmic_jax.files import print_failures, write_atomic, write_failures

FORMAT = "gmic-jax-cache/1"
INDEX_NAME = "index.json"
PARTIAL_INDEX_NAME = "index.partial.json"
WINDOW_NOISE_OPTION = "--window-noise"
# Stream tag of the window-noise generators (apart from other seeded streams of the same seed).
_NOISE_STREAM = 0x6E6F6973


def supports_window_noise(source) -> bool:
    """Whether contexts can be made for ``source``: images with a best centre (exam lists)."""
    from gmic_jax.data.sources import ExamListSource

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
    if window_noise is not None and window_noise is not False:
        if not supports_window_noise(source):
            raise ValueError(
                f"window noise needs an exam-list source (images with a best centre); got {type(source).__name__}"
            )
        if window_noise is True:
            window_noise = window_noise_amplitudes(source.window_shape)
        (ny, nx), s = window_noise
        window_noise = ((int(ny), int(nx)), int(s))
    else:
        window_noise = None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in [INDEX_NAME, PARTIAL_INDEX_NAME, FAILURES_NAME] + [p.name for p in output_dir.glob("*-[0-9]*.npy")]:
        (output_dir / stale).unlink(missing_ok=True)
    n = len(source)
    failures: list[DataError] = list(prior_failures)
    shards: list[dict] = []
    examples: list[dict] = []
    images = masks = contexts = context_masks = None
    window_shape = has_masks = context_shape = None
    iterator = _examples(source, num_workers, window_noise)
    if progress:
        try:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=n, desc="cache", unit="image")
        except ImportError:
            pass

    def close_shard():
        nonlocal images, masks, contexts, context_masks
        for array in (images, masks, contexts, context_masks):
            if array is not None:
                array.flush()
        images = masks = contexts = context_masks = None

    for i, example, context in iterator:
        if isinstance(example, DataError):
            failures.append(example)
            continue
        image = example[batch_lib.IMAGE][..., 0]
        if window_shape is None:
            window_shape, has_masks = image.shape, batch_lib.MASK in example
            if window_noise is not None:
                (ny, nx), s = window_noise
                context_shape = (window_shape[0] + 2 * (ny + s), window_shape[1] + 2 * (nx + s))
        if image.shape != window_shape:
            failures.append(
                DataError(
                    str(example[batch_lib.IMAGE_ID]), f"window {image.shape} differs from the first one {window_shape}"
                )
            )
            continue
        if images is None or shards[-1]["count"] == shard_size:
            close_shard()
            k = len(shards)
            capacity = min(shard_size, n - i)
            shard = {"images": f"images-{k:05d}.npy", "count": 0}
            images = np.lib.format.open_memmap(
                output_dir / shard["images"], mode="w+", dtype=batch_lib.IMAGE_DTYPE, shape=(capacity,) + window_shape
            )
            if has_masks:
                shard["masks"] = f"masks-{k:05d}.npy"
                masks = np.lib.format.open_memmap(
                    output_dir / shard["masks"],
                    mode="w+",
                    dtype=batch_lib.MASK_DTYPE,
                    shape=(capacity,) + window_shape + (2,),
                )
            if context_shape is not None:  # fresh files: zeros beyond each context
                shard["contexts"] = f"contexts-{k:05d}.npy"
                contexts = np.lib.format.open_memmap(
                    output_dir / shard["contexts"],
                    mode="w+",
                    dtype=batch_lib.IMAGE_DTYPE,
                    shape=(capacity,) + context_shape,
                )
                if has_masks:
                    shard["context_masks"] = f"context-masks-{k:05d}.npy"
                    context_masks = np.lib.format.open_memmap(
                        output_dir / shard["context_masks"],
                        mode="w+",
                        dtype=batch_lib.MASK_DTYPE,
                        shape=(capacity,) + context_shape + (2,),
                    )
            shards.append(shard)
        slot = shards[-1]["count"]
        images[slot] = image
        if has_masks:
            masks[slot] = example.get(batch_lib.MASK, np.zeros(window_shape + (2,), batch_lib.MASK_DTYPE))
        record = {
            "image_id": str(example[batch_lib.IMAGE_ID]),
            "breast_id": str(example[batch_lib.BREAST_ID]),
            "view": str(example[batch_lib.VIEW]),
            "label": [float(v) for v in example[batch_lib.LABEL]],
        }
        if context_shape is not None:
            h, w = context["pixels"].shape
            contexts[slot, :h, :w] = context["pixels"]
            if has_masks and context["masks"] is not None:
                context_masks[slot, :h, :w] = context["masks"]
            record["context"] = {
                "shape": [h, w],
                "window": [int(v) for v in context["window"]],
                "origin": [int(v) for v in context["origin"]],
            }
        shards[-1]["count"] += 1
        examples.append(record)
    close_shard()
    index = {
        "format": FORMAT,
        "window_shape": list(window_shape or ()),
        "has_masks": bool(has_masks),
        "num_examples": len(examples),
        "shards": shards,
        "examples": examples,
        "metadata": {
            **{k: getattr(source, k) for k in ("preprocessing", "iterations") if hasattr(source, k)},
            **(metadata or {}),
        },
    }
    if window_noise is not None:
        index["window_noise"] = {
            "crop_noise": list(window_noise[0]),
            "size_noise": window_noise[1],
            "context_shape": list(context_shape or ()),
        }
    if failures:
        write_failures(output_dir, failures)
    write_atomic(output_dir / (PARTIAL_INDEX_NAME if failures else INDEX_NAME), json.dumps(index))
    return len(examples), failures


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


# ------------------------------------------------------------------------------------------- CLI


def make_source(args):
    """The data source the CLI arguments describe (also used by the benchmark)."""
    window_shape = tuple(args.window_shape)
    common = dict(window_shape=window_shape)
    if args.source == "exam-list":
        from gmic_jax.data.sources import ExamListSource

        if not args.exam_list or not args.images:
            raise SystemExit("--source exam-list needs --exam-list and --images")
        return ExamListSource(args.exam_list, args.images, args.segmentations, **common)
    common.update(iterations=args.iterations)
    if args.preprocessing:
        common.update(preprocessing=args.preprocessing)
    if args.source == "manifest":
        from gmic_jax.data.manifest import manifest_source

        if not args.manifest:
            raise SystemExit("--source manifest needs --manifest")
        from gmic_jax.data.manifest import read_manifest

        source = manifest_source(args.manifest, split=args.split, strict=False, **common)
        source.load_errors = read_manifest(args.manifest)[1]
        return source
    if args.source == "cbis-tcia":
        from gmic_jax.data.cbis_ddsm import tcia_source

        if not args.root:
            raise SystemExit("--source cbis-tcia needs --root")
        from gmic_jax.data.cbis_ddsm import tcia_records

        source = tcia_source(
            args.root, args.split or "train", kinds=args.kinds, val_fraction=args.val_fraction, seed=args.seed, **common
        )
        source.load_errors = tcia_records(args.root, args.kinds, args.val_fraction, args.seed)[1]
        return source
    if args.source == "cbis-tfds":
        from gmic_jax.data.cbis_ddsm import tfds_source

        return tfds_source(
            args.tfds_config,
            args.split or "train",
            data_dir=args.data_dir,
            val_fraction=args.val_fraction,
            seed=args.seed,
            **common,
        )
    raise SystemExit(f"unknown source {args.source!r}")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, choices=["manifest", "exam-list", "cbis-tcia", "cbis-tfds"])
    parser.add_argument("--manifest", help="manifest CSV (--source manifest)")
    parser.add_argument("--split", choices=["train", "val", "test"], help="split to take (all if omitted, manifest)")
    parser.add_argument("--exam-list", help="preprocessed exam list (--source exam-list)")
    parser.add_argument("--images", help="cropped images folder (--source exam-list)")
    parser.add_argument("--segmentations", help="segmentations folder (--source exam-list)")
    parser.add_argument("--root", help="TCIA CBIS-DDSM download (--source cbis-tcia)")
    parser.add_argument("--kinds", nargs="+", default=["calc", "mass"], choices=["calc", "mass"])
    parser.add_argument("--tfds-config", default="original-calc", choices=["original-calc", "original-mass"])
    parser.add_argument("--data-dir", help="TFDS data_dir (--source cbis-tfds)")
    parser.add_argument(
        "--preprocessing",
        choices=list(PREPROCESSINGS),
        help="default: original for manifest, cbis_ddsm for CBIS-DDSM (see gmic_jax.preprocessing)",
    )
    parser.add_argument("--window-shape", type=int, nargs=2, default=[2944, 1920], metavar=("H", "W"))
    parser.add_argument("--iterations", type=int, default=100, help="erosion/dilation steps of the cropping")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="cache folder")
    add_source_arguments(parser)
    parser.add_argument("--shard-size", type=int, default=256, help="windows per shard file")
    parser.add_argument(
        WINDOW_NOISE_OPTION,
        action="store_true",
        help="also store each image's context for the original's training-time window noise "
        "(exam-list source; data.window_noise=True in training)",
    )
    parser.add_argument(
        "--crop-noise",
        type=int,
        nargs=2,
        metavar=("Y", "X"),
        help="window noise: max window shift in pixels (default: the original's 100, 100 scaled to --window-shape)",
    )
    parser.add_argument(
        "--size-noise",
        type=int,
        metavar="S",
        help="window noise: max border move in pixels (default: the original's 100, scaled)",
    )
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    if args.shard_size < 1 or min(args.window_shape) < 1:
        print(
            f"gmic-jax cache: error: --shard-size ({args.shard_size}) and --window-shape "
            f"({' '.join(map(str, args.window_shape))}) must be >= 1",
            file=sys.stderr,
        )
        return 2
    try:
        source = make_source(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    window_noise = None
    if getattr(args, "window_noise", False):
        if not supports_window_noise(source):
            print(
                f"error: {WINDOW_NOISE_OPTION} needs --source exam-list (images with a best centre); "
                f"got --source {args.source}",
                file=sys.stderr,
            )
            return 2
        default_crop, default_size = window_noise_amplitudes(tuple(args.window_shape))
        window_noise = (
            tuple(args.crop_noise) if args.crop_noise else default_crop,
            default_size if args.size_noise is None else args.size_noise,
        )
        if min(*window_noise[0], window_noise[1]) < 0:
            print("error: --crop-noise and --size-noise must be >= 0", file=sys.stderr)
            return 2
    elif getattr(args, "crop_noise", None) or getattr(args, "size_noise", None) is not None:
        print(f"error: --crop-noise/--size-noise need {WINDOW_NOISE_OPTION}", file=sys.stderr)
        return 2
    # The split the cache holds (CBIS-DDSM sources take 'train' when none is named; a manifest
    # without --split and an exam list hold all they list: none recorded). evaluate names its keys by it.
    split = args.split or ("train" if args.source in ("cbis-tcia", "cbis-tfds") else None)
    metadata = {"source": args.source, "split": split, "window_shape": list(args.window_shape)}
    count, failures = build_cache(
        source,
        args.output,
        shard_size=args.shard_size,
        num_workers=args.num_workers,
        metadata=metadata,
        progress=not args.no_progress,
        prior_failures=getattr(source, "load_errors", ()),
        window_noise=window_noise,
    )
    if failures:
        print_failures(failures)
        print(
            f"{len(failures)} failure(s); {count} window(s) cached but the cache is NOT complete "
            f"(no {INDEX_NAME}; see {Path(args.output) / FAILURES_NAME})",
            file=sys.stderr,
        )
        return 1
    print(f"{count} window(s) cached in {args.output}")
    return 0
