"""`gmic-jax cache`: preprocess a data source once into memory-mappable shards of uint16 windows.

    gmic-jax cache --output CACHE_DIR --source manifest --manifest data.csv --split train
    gmic-jax cache --output CACHE_DIR --source exam-list --exam-list OUT/exam_list.pkl \
        --images OUT/cropped_images [--segmentations SEG_DIR]
    gmic-jax cache --output CACHE_DIR --source cbis-tcia --root CBIS_ROOT --split train [--kinds calc mass]
    gmic-jax cache --output CACHE_DIR --source cbis-tfds --tfds-config original-calc --split train

Layout of CACHE_DIR: ``images-NNNNN.npy`` (n, H, W) uint16 and, with masks, ``masks-NNNNN.npy``
(n, H, W, 2) uint8 -- plain .npy files, opened with ``np.load(mmap_mode='r')`` -- and
``index.json`` (format, window shape, preprocessing, shards and per-example ids/labels/views),
written last. A cache without ``index.json`` is incomplete: when any example fails, the run
reports every failure, exits 1 and writes ``index.partial.json`` + ``failures.txt`` instead.
:class:`CacheSource` reads a cache as a random-access source of examples (batch layout).
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

FORMAT = "gmic-jax-cache/1"
INDEX_NAME = "index.json"
PARTIAL_INDEX_NAME = "index.partial.json"
FAILURES_NAME = "failures.txt"


_WORKER_SOURCE = None


def _init_worker(source):
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


def _load_example(i, source=None):
    source = _WORKER_SOURCE if source is None else source
    try:
        return i, source[i]
    except DataError as e:
        return i, e
    except Exception as e:  # one bad example must not stop the batch
        return i, DataError(f"example {i}", f"{type(e).__name__}: {e}")


def _examples(source, num_workers: int):
    """(index, example | DataError) in index order; worker processes get the source once."""
    n = len(source)
    if num_workers <= 1 or n <= 1:
        yield from (_load_example(i, source) for i in range(n))
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker,
                                                initargs=(source,)) as pool:
        yield from pool.map(_load_example, range(n), chunksize=1)


def build_cache(source, output_dir, shard_size: int = 256, num_workers: int = 1, metadata: Optional[dict] = None,
                progress: bool = False, prior_failures=()) -> tuple[int, list[DataError]]:
    """Write every example of ``source`` into ``output_dir``; returns (examples written, failures).

    ``prior_failures`` (e.g. bad manifest rows found before) count as failures of this build.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in [INDEX_NAME, PARTIAL_INDEX_NAME, FAILURES_NAME] + [p.name for p in output_dir.glob("*-[0-9]*.npy")]:
        (output_dir / stale).unlink(missing_ok=True)
    n = len(source)
    failures: list[DataError] = list(prior_failures)
    shards: list[dict] = []
    examples: list[dict] = []
    images = masks = None
    window_shape = has_masks = None
    iterator = _examples(source, num_workers)
    if progress:
        try:
            from tqdm import tqdm
            iterator = tqdm(iterator, total=n, desc="cache", unit="image")
        except ImportError:
            pass

    def close_shard():
        nonlocal images, masks
        if images is not None:
            images.flush()
            if masks is not None:
                masks.flush()
            images = masks = None

    for i, example in iterator:
        if isinstance(example, DataError):
            failures.append(example)
            continue
        image = example[batch_lib.IMAGE][..., 0]
        if window_shape is None:
            window_shape, has_masks = image.shape, batch_lib.MASK in example
        if image.shape != window_shape:
            failures.append(DataError(str(example[batch_lib.IMAGE_ID]),
                                      f"window {image.shape} differs from the first one {window_shape}"))
            continue
        if images is None or shards[-1]["count"] == shard_size:
            close_shard()
            k = len(shards)
            capacity = min(shard_size, n - i)
            shard = {"images": f"images-{k:05d}.npy", "count": 0}
            images = np.lib.format.open_memmap(output_dir / shard["images"], mode="w+",
                                               dtype=batch_lib.IMAGE_DTYPE, shape=(capacity,) + window_shape)
            if has_masks:
                shard["masks"] = f"masks-{k:05d}.npy"
                masks = np.lib.format.open_memmap(output_dir / shard["masks"], mode="w+",
                                                  dtype=batch_lib.MASK_DTYPE, shape=(capacity,) + window_shape + (2,))
            shards.append(shard)
        slot = shards[-1]["count"]
        images[slot] = image
        if has_masks:
            masks[slot] = example.get(batch_lib.MASK, np.zeros(window_shape + (2,), batch_lib.MASK_DTYPE))
        shards[-1]["count"] += 1
        examples.append({
            "image_id": str(example[batch_lib.IMAGE_ID]), "breast_id": str(example[batch_lib.BREAST_ID]),
            "view": str(example[batch_lib.VIEW]), "label": [float(v) for v in example[batch_lib.LABEL]],
        })
    close_shard()
    index = {"format": FORMAT, "window_shape": list(window_shape or ()), "has_masks": bool(has_masks),
             "num_examples": len(examples), "shards": shards, "examples": examples,
             "metadata": metadata or {}}
    name = PARTIAL_INDEX_NAME if failures else INDEX_NAME
    if failures:
        (output_dir / FAILURES_NAME).write_text("".join(f"{e}\n" for e in failures), encoding="utf-8")
    tmp = output_dir / f".{name}.tmp"
    tmp.write_text(json.dumps(index), encoding="utf-8")
    os.replace(tmp, output_dir / name)
    return len(examples), failures


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
            raise DataError(index_path, "cache is incomplete (its build reported failures; see failures.txt)"
                            if partial else "not a gmic-jax cache (no index.json)")
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
            arr = self._maps[name] = np.load(self.cache_dir / name, mmap_mode="r")
        return arr

    def __getitem__(self, index: int) -> dict:
        s, j = self._locations[index]
        shard = self.index["shards"][s]
        meta = self.examples[index]
        example = {
            batch_lib.IMAGE: np.array(self._map(shard["images"])[j])[..., None],
            batch_lib.LABEL: np.asarray(meta["label"], dtype=batch_lib.LABEL_DTYPE),
            batch_lib.IMAGE_ID: np.str_(meta["image_id"]),
            batch_lib.BREAST_ID: np.str_(meta["breast_id"]),
            batch_lib.VIEW: np.str_(meta["view"]),
        }
        if self.has_masks:
            example[batch_lib.MASK] = np.array(self._map(shard["masks"])[j])
        return example

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
        source = tcia_source(args.root, args.split or "train", kinds=args.kinds, val_fraction=args.val_fraction,
                             seed=args.seed, **common)
        source.load_errors = tcia_records(args.root, args.kinds, args.val_fraction, args.seed)[1]
        return source
    if args.source == "cbis-tfds":
        from gmic_jax.data.cbis_ddsm import tfds_source
        return tfds_source(args.tfds_config, args.split or "train", data_dir=args.data_dir,
                           val_fraction=args.val_fraction, seed=args.seed, **common)
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
    parser.add_argument("--preprocessing", choices=["gmic", "cbis_ddsm"],
                        help="default: gmic for manifest, cbis_ddsm for CBIS-DDSM")
    parser.add_argument("--window-shape", type=int, nargs=2, default=[2944, 1920], metavar=("H", "W"))
    parser.add_argument("--iterations", type=int, default=100, help="erosion/dilation steps of the cropping")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="cache folder")
    add_source_arguments(parser)
    parser.add_argument("--shard-size", type=int, default=256, help="windows per shard file")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    try:
        source = make_source(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    metadata = {"source": args.source, "split": args.split, "window_shape": list(args.window_shape),
                "preprocessing": getattr(source, "preprocessing", "gmic")}
    count, failures = build_cache(source, args.output, shard_size=args.shard_size, num_workers=args.num_workers,
                                  metadata=metadata, progress=not args.no_progress,
                                  prior_failures=getattr(source, "load_errors", ()))
    if failures:
        for e in failures:
            print(f"error: {e}", file=sys.stderr)
        print(f"{len(failures)} failure(s); {count} window(s) cached but the cache is NOT complete "
              f"(no {INDEX_NAME}; see {Path(args.output) / FAILURES_NAME})", file=sys.stderr)
        return 1
    print(f"{count} window(s) cached in {args.output}")
    return 0
