"""The cache (`gmic-jax cache`), its reader, and the input pipeline (Grain: plans, workers, failures,
device prefetch)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gmic_jax.data import batch as batch_lib
from gmic_jax.data.cache import CacheSource, build_cache
from gmic_jax.data.image import DataError, write_png
from gmic_jax.data.manifest import manifest_source
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

    args = [
        "cache",
        "--output",
        str(tmp_path / "c"),
        "--source",
        "manifest",
        "--manifest",
        str(manifest),
        "--window-shape",
        "48",
        "32",
        "--iterations",
        "2",
        "--num-workers",
        "2",
        "--shard-size",
        "4",
        "--no-progress",
    ]
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


class _Flaky:
    """A source whose example ``bad`` cannot be read (as a corrupt file would)."""

    def __init__(self, source, bad):
        self.source, self.bad = source, bad

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if i == self.bad:
            raise DataError(f"broken-{i}.png", "truncated PNG")
        return self.source[i]


def _plan():
    """A balanced training order over 7 examples in global batches of 4 (2 processes x 2 rows)."""
    labels = np.array([[i % 2, int(i == 3)] for i in range(7)], np.float32)
    return labels, dict(batch_size=4, steps_per_epoch=1, num_steps=3, seed=5, balanced=False)


def test_train_plan_is_the_epoch_order_cut_into_process_rows():
    from gmic_jax.train.input import TrainPlan
    from gmic_jax.train.sampling import epoch_order

    labels, kw = _plan()
    whole = TrainPlan(labels, **kw)
    halves = [TrainPlan(labels, **kw, process_index=p, process_count=2) for p in range(2)]
    for step in range(3):
        expected = epoch_order(labels, step, 5, False)[:4]  # one step per epoch here
        assert [i for i, _ in whole[step]] == expected.tolist()
        assert {e for _, e in whole[step]} == {step}
        assert halves[0][step] + halves[1][step] == whole[step]  # the processes split the global batch
    with pytest.raises(IndexError):
        whole[3]


@pytest.mark.parametrize("workers", [0, 2])
def test_grain_batches_equal_in_process_batches(manifest, tmp_path, workers):
    """Worker processes change nothing: every batch equals the examples stacked here, in plan order,
    and starting at a later step (a resumed run) gives the same tail."""
    from gmic_jax.data.pipeline import load_batches
    from gmic_jax.train.input import TrainExamples, TrainPlan

    build_cache(_source(manifest), tmp_path / "cache", shard_size=4)
    source = CacheSource(tmp_path / "cache")
    labels, kw = _plan()
    plan = TrainPlan(labels, **kw)
    examples = TrainExamples(source, seed=5)
    expected = [batch_lib.stack([examples(t) for t in plan[k]]) for k in range(len(plan))]
    for start in (0, 1):
        with load_batches(plan, examples, workers=workers, start=start) as batches:
            got = list(batches)
        assert len(got) == len(plan) - start
        for want, batch in zip(expected[start:], got):
            assert batch["ok"].all() and batch["failures"] == ()
            for key in ("image", "label"):
                assert batch[key].dtype == want[key].dtype
                np.testing.assert_array_equal(batch[key], want[key])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_example_fails_alone_and_the_iterator_goes_on(manifest, workers):
    from gmic_jax.data.pipeline import SourceExamples, load_batches

    source = _Flaky(_source(manifest), bad=4)
    plan = [(0, 1, 2), (3, 4, 5), (6, 6, 6)]
    with load_batches(plan, SourceExamples(source), workers=workers) as batches:
        got = list(batches)
    assert len(got) == 3
    assert [b["ok"].tolist() for b in got] == [[True] * 3, [True, False, True], [True] * 3]
    [failure] = got[1]["failures"]
    assert (failure.row, failure.task) == (1, 4) and str(failure) == "broken-4.png: truncated PNG"
    assert not got[1]["image"][1].any() and got[1]["image_id"][1] == ""  # the failed row is blank
    np.testing.assert_array_equal(got[1]["image"][2], source[5]["image"])
    # Everything fails: the batch says so instead of raising.
    with load_batches([(4,)], SourceExamples(source), workers=workers) as batches:
        [alone] = list(batches)
    assert set(alone) == {"ok", "failures"} and not alone["ok"].any()


def test_batches_go_to_device_ahead_and_errors_reach_the_consumer(manifest):
    import jax

    from gmic_jax.data.pipeline import SourceExamples, load_batches

    source = _source(manifest)
    plan = [(0, 1, 2), (3, 4, 5)]
    with load_batches(plan, SourceExamples(source), put=jax.device_put) as batches:
        for tasks, batch in zip(plan, batches):
            assert isinstance(batch["image"], jax.Array) and isinstance(batch["image_id"], np.ndarray)
            np.testing.assert_array_equal(
                np.asarray(batch["image"]), batch_lib.stack([source[i] for i in tasks])["image"]
            )

    def put(x):
        raise RuntimeError("device full")

    with load_batches(plan, SourceExamples(source), put=put) as batches:
        with pytest.raises(RuntimeError, match="device full"):
            next(batches)
