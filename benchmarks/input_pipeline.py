"""Input pipeline throughput: images per second per core, from raw PNG, raw DICOM and the cache.

    python benchmarks/input_pipeline.py                      # ~30 s on a 2-core CPU
    python benchmarks/input_pipeline.py --images 8 --repeats 5 --grain-workers 2

Each path produces the model's 2944 x 1920 uint16 window (batch layout) in ONE process, so the
figures are per core:

- ``png``   -- 16-bit PNG (12-bit values) -> read -> crop (erosion/component/dilation) -> best
  centre -> window (the "gmic" preprocessing, as a manifest dataset does it);
- ``dicom`` -- the same from uncompressed 16-bit DICOM (pydicom);
- ``cache`` -- a memory-mapped uint16 window from ``gmic-jax cache`` (page cache warm);
- ``grain`` (``--grain-workers N``) -- batches of the cache through Grain with N worker processes;
  reported as total images/s and per worker.

The images are synthetic 3328 x 2560 "breasts" (about the size of a full-field digital
mammogram) unless ``--sample-exam DIR`` points at a folder of PNGs. Medians of ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmic_jax.data.cache import CacheSource, build_cache  # noqa: E402
from gmic_jax.data.image import write_png  # noqa: E402
from gmic_jax.data.manifest import manifest_source  # noqa: E402
from gmic_jax.data.testing import breast_image, write_dicom  # noqa: E402


def _write_dataset(folder: Path, n: int, shape, sample_exam):
    rows = ["path,patient,laterality,view,benign,malignant,split\n"]
    dicom_rows = list(rows)
    pngs = sorted(Path(sample_exam).glob("*.png")) if sample_exam else []
    for i in range(n):
        view = ("CC", "MLO")[i % 2]
        side = "LR"[(i // 2) % 2]
        if pngs:
            from gmic_jax.data.image import read_png_array
            image = read_png_array(pngs[i % len(pngs)])
        else:
            image = breast_image(*shape, seed=i, points_right=side == "L")
        write_png(folder / f"{i}.png", image)
        write_dicom(folder / f"{i}.dcm", image, bits_stored=16, laterality=side, view=view)
        rows.append(f"{i}.png,p{i},{side},{view},0,0,train\n")
        dicom_rows.append(f"{i}.dcm,p{i},{side},{view},0,0,train\n")
    (folder / "png.csv").write_text("".join(rows))
    (folder / "dicom.csv").write_text("".join(dicom_rows))


def _rate(fn, count: int, repeats: int) -> tuple[float, list[float]]:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates), rates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=2, default=[3328, 2560])
    parser.add_argument("--sample-exam", help="folder of 16-bit PNGs to use instead of synthetic images")
    parser.add_argument("--grain-workers", type=int, default=0, help="also time Grain with N worker processes")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    results = {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
               "numpy": np.__version__, "images": args.images, "repeats": args.repeats,
               "image_shape": args.shape if not args.sample_exam else "sample exam"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write_dataset(folder, args.images, tuple(args.shape), args.sample_exam)
        png = manifest_source(folder / "png.csv")
        dicom = manifest_source(folder / "dicom.csv")
        build_cache(png, folder / "cache", shard_size=args.images)
        cache = CacheSource(folder / "cache")
        for i in range(len(png)):  # same windows from every path
            assert np.array_equal(png[i]["image"], dicom[i]["image"])
            assert np.array_equal(png[i]["image"], cache[i]["image"])
        for name, source in (("png", png), ("dicom", dicom), ("cache", cache)):
            source[0]  # warm imports / page cache
            median, rates = _rate(lambda s=source: [s[i] for i in range(len(s))], len(source), args.repeats)
            results[f"{name}_images_per_s_per_core"] = round(median, 2)
            results[f"{name}_runs"] = [round(r, 2) for r in rates]
        if args.grain_workers:
            from gmic_jax.data.pipeline import make_loader

            def run_grain():
                for _ in make_loader(cache, args.batch_size, worker_count=args.grain_workers, shard_index=0,
                                     shard_count=1, num_epochs=4, drop_remainder=False):
                    pass

            median, rates = _rate(run_grain, 4 * len(cache), args.repeats)
            results["grain_workers"] = args.grain_workers
            results["grain_cache_images_per_s"] = round(median, 2)
            results["grain_cache_images_per_s_per_worker"] = round(median / args.grain_workers, 2)
    for key, value in results.items():
        print(f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
