"""The cache (`gmic-jax cache`), its reader, the Grain loader and device prefetch."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gmic_jax.data import batch as batch_lib
from gmic_jax.data.cache import CacheSource, build_cache
from gmic_jax.data.image import DataError, write_png
from gmic_jax.data.manifest import manifest_source
from gmic_jax.data.pipeline import make_loader, prefetch_to_device, simple_batches
from gmic_jax.data.testing import breast_image

WINDOW = (48, 32)


@pytest.fixture
def manifest(tmp_path):
    rows = ["path,patient,laterality,view,benign,malignant,split,mask_benign\n"]
    for i in range(7):
        write_png(tmp_path / f"{i}.png", breast_image(80, 56, seed=i, points_right=i % 2 == 0))
        mask = ""
        if i == 2:
            m = np.zeros((80, 56), np.uint8)
            m[30:40, 10:20] = 1
            write_png(tmp_path / "m2.png", m)
            mask = "m2.png"
        rows.append(f"{i}.png,p{i // 2},{'LR'[i % 2]},{('CC', 'MLO')[i // 2 % 2]},{i % 2},{int(i == 3)},train,{mask}\n")
    (tmp_path / "data.csv").write_text("".join(rows))
    return tmp_path / "data.csv"


def _source(csv):
    return manifest_source(csv, window_shape=WINDOW, iterations=2)


def test_cache_round_trip(manifest, tmp_path):
    source = _source(manifest)
    count, failures = build_cache(source, tmp_path / "cache", shard_size=3)
    assert (count, failures) == (7, [])
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [3, 3, 1]
    cached = CacheSource(tmp_path / "cache")
    assert len(cached) == 7 and cached.window_shape == WINDOW
    for i in range(7):
        a, b = source[i], cached[i]
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            assert a[key].dtype == b[key].dtype


def test_cache_with_failures_is_not_complete(manifest, tmp_path):
    write_png(manifest.parent / "4.png", np.zeros((80, 56), np.uint16))  # blank
    count, failures = build_cache(_source(manifest), tmp_path / "cache", shard_size=4)
    assert count == 6 and len(failures) == 1 and "4.png: blank image" in str(failures[0])
    assert not (tmp_path / "cache" / "index.json").exists()
    assert "4.png" in (tmp_path / "cache" / "failures.txt").read_text()
    with pytest.raises(DataError, match="cache is incomplete"):
        CacheSource(tmp_path / "cache")


def test_cache_cli(manifest, tmp_path, capsys):
    from gmic_jax.cli import main

    args = ["cache", "--output", str(tmp_path / "c"), "--source", "manifest", "--manifest", str(manifest),
            "--window-shape", "48", "32", "--iterations", "2", "--num-workers", "2", "--shard-size", "4",
            "--no-progress"]
    assert main(args) == 0
    assert len(CacheSource(tmp_path / "c")) == 7
    # a bad manifest row: the rest is cached, the run fails, no index.json
    with open(manifest, "a") as f:
        f.write("9.png,p9,L,CC,0,0,train,\n")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "data.csv:9: image" in err and "not found" in err
    assert not (tmp_path / "c" / "index.json").exists()
    assert json.loads((tmp_path / "c" / "index.partial.json").read_text())["num_examples"] == 7


def test_grain_loader_shards_and_batches(manifest, tmp_path):
    build_cache(_source(manifest), tmp_path / "cache", shard_size=4)
    source = CacheSource(tmp_path / "cache")
    seen = []
    for shard in range(2):
        loader = make_loader(source, 2, shuffle=True, seed=3, shard_index=shard, shard_count=2,
                             worker_count=0)
        batches = list(loader)
        for b in batches:
            batch_lib.check_batch(b, WINDOW)
            assert b["image"].shape[0] == 2
            seen.extend(b["image_id"].tolist())
    assert len(seen) == len(set(seen)) == 4  # disjoint shards of 3, one full batch of 2 each
    again = [b["image_id"].tolist() for b in make_loader(source, 2, shuffle=True, seed=3, shard_index=0,
                                                          shard_count=2)]
    assert sum(again, []) == seen[:len(sum(again, []))]  # seeded: same order


def test_grain_worker_processes(manifest, tmp_path):
    build_cache(_source(manifest), tmp_path / "cache", shard_size=4)
    source = CacheSource(tmp_path / "cache")
    ids = []
    for b in make_loader(source, 3, worker_count=1, shard_index=0, shard_count=1, drop_remainder=False):
        batch_lib.check_batch(b, WINDOW)
        ids.extend(b["image_id"].tolist())
        del b
    assert sorted(ids) == sorted(str(source[i]["image_id"]) for i in range(7))


def test_simple_batches_and_prefetch(manifest, tmp_path):
    import jax

    source = _source(manifest)
    batches = list(simple_batches(source, 3))
    assert [b["image"].shape[0] for b in batches] == [3, 3, 1]
    on_device = list(prefetch_to_device(iter(batches), size=2))
    for host, dev in zip(batches, on_device):
        assert isinstance(dev["image"], jax.Array) and isinstance(dev["image_id"], np.ndarray)
        np.testing.assert_array_equal(np.asarray(dev["image"]), host["image"])

    def broken():
        yield batches[0]
        raise DataError("x.png", "boom")

    with pytest.raises(DataError, match="boom"):
        list(prefetch_to_device(broken()))
