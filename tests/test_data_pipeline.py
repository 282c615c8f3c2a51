"""The cache (`gmic-jax cache`), its reader, and the input pipeline (Grain: plans, workers, failures,
device prefetch)."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time

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


@pytest.mark.parametrize("workers", [0, 1, 2])
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
    for start in (0, 1) if workers != 1 else (1,):  # (one worker: one start, to save its start-up time)
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


class _Windows:
    """A source of ``n`` 128 x 64 windows, window ``i`` filled with ``i``."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((128, 64), i, np.uint16), "label": np.array([i % 2, 1], np.float32), "id": f"w{i}"}


def _slots_of_this_process():
    from gmic_jax.data.shared_slots import SLOT_PREFIX

    prefix = f"{SLOT_PREFIX}{os.getpid()}_"
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix)) if os.path.isdir("/dev/shm") else []


def test_a_slot_is_reused_only_once_no_array_of_its_batch_is_left():
    """A worker's ring, here in one process: a batch's slot is written again only after the consumer
    has dropped every array of that batch (a view of one image, a device put of it included)."""
    import jax

    from gmic_jax.data.pipeline import SourceExamples, load_batch
    from gmic_jax.data.shared_slots import OpenBatches, Ring

    load = SourceExamples(_Windows(64))
    opener = OpenBatches()
    ring = Ring(opener.prefix)

    def batch(k):
        return opener(ring.share(load_batch(load, (k, k + 1), ring.alloc)))

    try:
        first = batch(0)
        assert list(first) == ["image", "label", "id", "ok", "failures"] and first["id"].tolist() == ["w0", "w1"]
        row = first["image"][1]  # a view of one image outlives its batch
        label = first["label"]  # small: not in the slot (keeping it does not keep the slot)
        on_device = jax.device_put(first["image"])  # XLA:CPU may use the host array in place
        del first
        second = batch(2)  # slot 0 is still referenced: a second slot
        assert len(ring.slots) == 2
        del second
        for k in range(4, 20, 2):  # slot 1 over and over
            b = batch(k)
            assert b["image"][:, 0, 0].tolist() == [k, k + 1] and b["id"].tolist() == [f"w{k}", f"w{k + 1}"]
            del b
        assert len(ring.slots) == 2 and (row == 1).all() and label.tolist() == [[0, 1], [1, 1]]
        np.testing.assert_array_equal(np.asarray(on_device)[:, 0, 0], [0, 1])
        del row
        assert (ring.slots[0].flag[0], ring.slots[1].flag[0]) == (1, 0)  # the device array holds slot 0
        del on_device
        gc.collect()  # jax lets go of the host array it used in place at the next collection
        assert ring.slots[0].flag[0] == 0
        b = batch(20)
        assert len(ring.slots) == 2 and b["image"][:, 0, 0].tolist() == [20, 21]
        del b
        # A failed row in a reused slot is zeros, as in a fresh one.
        b = opener(ring.share(load_batch(SourceExamples(_Flaky(_Windows(64), bad=9)), (22, 9), ring.alloc)))
        assert len(ring.slots) == 2 and b["ok"].tolist() == [True, False] and not b["image"][1].any()
        assert (b["image"][0] == 22).all()
        del b
        # A bigger batch replaces a free slot; the consumer unmaps the old one.
        b = opener(ring.share(load_batch(lambda i: {"image": np.ones((256, 64), np.uint16)}, (0,), ring.alloc)))
        assert len(ring.slots) == 2 and len(opener._maps) == 2 and b["image"].shape == (1, 256, 64)
        del b
    finally:
        opener.close()
        ring.close()
    assert _slots_of_this_process() == []


@pytest.mark.parametrize("on_device", [False, True])
def test_workers_never_overwrite_a_batch_the_consumer_holds(on_device):
    """Two workers reusing their slots (``on_device``: batches put on device ahead by a thread;
    XLA:CPU may use their host memory in place): batches the consumer keeps stay intact while many
    more are produced, after close() too; the last batches, in new slots (the consumer keeps them
    all), arrive intact although their workers were stopped before they were taken (without the
    device thread, which takes batches ahead); close() leaves no shared memory behind."""
    import jax

    from gmic_jax.data.pipeline import SourceExamples, load_batches

    put = jax.device_put if on_device else None

    plan = [(2 * k, 2 * k + 1) for k in range(40)]
    kept = (0, 7, *range(26, 40))
    held = []
    with load_batches(plan, SourceExamples(_Windows(80)), workers=2, put=put) as batches:
        for k in range(40):
            b = next(batches)
            assert isinstance(b["image"], jax.Array) == on_device
            assert np.asarray(b["image"])[:, 0, 0].tolist() == [2 * k, 2 * k + 1]
            if k in kept:
                held.append(b)
            if k == 26:
                mapped = len(batches._opener._maps)
            if k == 37:  # Grain stops the workers once their part of the plan is read: wait for that
                time.sleep(1.5)
            del b
    assert mapped < 24, mapped  # slots reused (a fresh one per batch: 27 by now)
    assert _slots_of_this_process() == []
    for k, b in zip(kept, held):
        want = np.repeat([2 * k, 2 * k + 1], 128 * 64).reshape(2, 128, 64)
        np.testing.assert_array_equal(np.asarray(b["image"]), want)
        np.testing.assert_array_equal(np.asarray(b["label"]), [[0, 1], [1, 1]])


_CONSUMER_SCRIPT = """
import multiprocessing, sys
from gmic_jax.data.pipeline import SourceExamples, load_batches
sys.path.insert(0, sys.argv[1])
from test_data_pipeline import _Windows

if __name__ == "__main__":
    batches = load_batches([(k, k + 1) for k in range(10**6)], SourceExamples(_Windows(40)), workers=1)
    held = [next(batches) for _ in range(3)]
    print(*[p.pid for p in multiprocessing.active_children() if p.name.startswith("grain")], flush=True)
    input()
"""


def test_worker_slots_leave_nothing_behind_after_sigkill(tmp_path):
    """After SIGKILL of the consumer (a fresh interpreter) its worker exits too, unlinking the slots
    the consumer never mapped: no slot is left and the resource tracker has no shared memory to
    clean up (each registration was matched by an unregistration)."""
    from gmic_jax.data.shared_slots import SLOT_PREFIX

    script = tmp_path / "consumer.py"
    script.write_text(_CONSUMER_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, script, os.path.dirname(__file__)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="default"),
    )
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        os.kill(proc.pid, signal.SIGKILL)
        assert len(workers) == 1
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(os.path.exists(f"/proc/{w}") for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if os.path.exists(f"/proc/{w}")], "orphan worker"
        stderr = proc.stderr.read()  # to its end: the resource tracker (the last holder) has exited
        assert "shared_memory" not in stderr and "Traceback" not in stderr, stderr[-3000:]  # (Grain's semaphores leak)
        assert [n for n in os.listdir("/dev/shm") if n.startswith(f"{SLOT_PREFIX}{proc.pid}_")] == []
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 0), (3, 2), (8, 7), (64, 16)])
def test_default_workers_is_the_cores_less_one_when_that_leaves_two(monkeypatch, cores, workers):
    from gmic_jax.data.pipeline import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_workers() == workers
