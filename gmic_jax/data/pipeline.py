"""The input pipeline: random-access sources -> Grain -> batches -> device.

One way through the data for training, validation during training and ``gmic-jax evaluate``:

    plan = [(0, 1, 2, 3), (4, 5, 6, 7)]              # batch k -> its tasks (what `load` takes)
    batches = load_batches(plan, SourceExamples(source), workers=2, put=jax.device_put)
    for batch in batches:                            # image/label/mask on device, the rest numpy
        ...
    batches.close()

- A **plan** is any random-access sequence (``len``, ``plan[k]``) whose item ``k`` is the tuple of
  tasks of batch ``k`` in this process (training: :class:`gmic_jax.train.input.TrainPlan`, this
  process's rows of each global batch). Resuming at batch ``k`` is ``start=k``.
- A **load** function (picklable: worker processes receive it once) turns one task into one
  example in the batch layout (:mod:`gmic_jax.data.batch`), e.g. :class:`SourceExamples` over any
  random-access source (cache, cache with window noise, manifest, exam list, synthetic).
- Grain maps the plan through :func:`load_batch`: in this process (``workers=0``, one prefetch
  thread) or in ``workers`` worker processes, each building whole batches, delivered in the
  plan's order. The batches are therefore the same, bit for bit, for any number of workers.
- **Failures are values.** A task whose load raises does not stop the iterator: its row is zeros,
  ``batch["ok"][row]`` is False and ``batch["failures"]`` holds a :class:`Failure` naming the
  file and what is wrong. The consumer decides: training stops with the message (its data would
  otherwise differ from what its config says), evaluation scores the rest and reports them; a
  consumer with per-exam semantics (predict) puts the exam in its tasks and fails that exam only.
- **No orphans.** A worker process exits as soon as the process that started it is gone, even
  after SIGKILL (Grain's own workers would wait forever on a full queue).
- **One write per batch.** A worker stacks each batch into shared memory it reuses (a *slot*),
  written again only once no array of its batch is referenced here (views and device arrays
  included): holding a batch is safe, but an image kept beyond its batch keeps its slot (copy it).
  ``close()`` leaves no shared memory behind. The slots: :mod:`gmic_jax.data.shared_slots`.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import multiprocessing
import os
import threading
from multiprocessing.connection import wait
from typing import Any, Callable, Optional, Sequence

import numpy as np
from absl import flags

from gmic_jax.data import batch as batch_lib
from gmic_jax.data import shared_slots as slots
from gmic_jax.data.image import DataError

OK = "ok"
FAILURES = "failures"
MAX_DEFAULT_WORKERS = 16


@dataclasses.dataclass(frozen=True)
class Failure:
    """Task ``task`` (row ``row`` of its batch) could not be loaded: ``message`` says why; ``path``
    is the file a :class:`~gmic_jax.data.image.DataError` names (else None) and ``problem`` what
    is wrong with it (the message without the file)."""

    row: int
    task: Any
    message: str
    path: Optional[str] = None
    problem: str = ""

    def __str__(self) -> str:
        return self.message


def default_workers() -> int:
    """Worker processes by default: the cores this process may use less one (for the process that
    takes the batches: the training loop, its device puts), at most 16, and 0 (load in this process)
    when that leaves fewer than two. From the rows of benchmarks/RESULTS.md (2 cores, issue 23),
    where a worker's cost per batch is one write into a reused shared-memory slot: one worker loads
    the CPU-bound paths (window noise, PNG: the load is the work, wherever it runs) at the in-process
    rate, i.e. at half of it per busy core, and only the plain cache faster (1.4-2.9x); it also
    costs a process start (2-3 s here) per pipeline, paid again by every validation pass. From two
    spare cores on, each worker adds about the in-process rate. (A 2-core host feeding an
    accelerator from a plain cache gains from ``workers=1``: set it.)"""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    workers = min(MAX_DEFAULT_WORKERS, cores - 1)
    return workers if workers >= 2 else 0


class SourceExamples:
    """Task = index -> ``source[index]``, optionally only ``keys`` of it."""

    def __init__(self, source, keys: Optional[Sequence[str]] = None):
        self.source = source
        self.keys = tuple(keys) if keys is not None else None

    def __call__(self, index) -> dict:
        example = self.source[int(index)]
        return example if self.keys is None else {k: example[k] for k in self.keys}


def _failure(row: int, task, error: BaseException) -> Failure:
    if isinstance(error, DataError):  # its text is already "<file>: <problem>"
        return Failure(row, task, str(error), error.path, error.problem)
    problem = f"{type(error).__name__}: {error}"
    return Failure(row, task, f"example {task!r}: {problem}", None, problem)


def load_batch(load: Callable, tasks: Sequence, alloc: Optional[Callable] = None) -> dict:
    """The examples of ``tasks`` stacked into one batch, failures as values (see the module doc).

    Keys: the batch layout's (those the examples have), ``ok`` (n,) bool and ``failures`` (a tuple
    of :class:`Failure`). When every task fails only ``ok`` and ``failures`` are present.
    ``alloc`` ({key: (shape, dtype)} -> {key: array}) gives the arrays the numeric keys are stacked
    into (in a worker process: a reused shared-memory slot for the big ones,
    :class:`~gmic_jax.data.shared_slots.Ring`; a key it leaves out is stacked into a fresh array); by
    default fresh 64-byte-aligned buffers."""
    rows: list = []
    failures: list = []
    for row, task in enumerate(tasks):
        try:
            rows.append(load(task))
        except Exception as e:  # one bad example must not stop the batch or the iterator
            rows.append(None)
            failures.append(_failure(row, task, e))
    good = next((r for r in rows if r is not None), None)
    batch: dict = {}
    if good is not None:
        blank = {k: np.zeros_like(np.asarray(v)) for k, v in good.items()}
        columns = {k: [np.asarray((blank if r is None else r)[k]) for r in rows] for k in good}
        numeric = {k: ((len(v),) + v[0].shape, v[0].dtype) for k, v in columns.items() if v[0].dtype.kind in "biuf"}
        out = (alloc or slots.aligned_arrays)(numeric)
        batch = {k: np.stack(v, out=out[k]) if k in out else np.stack(v) for k, v in columns.items()}
    batch[OK] = np.array([r is not None for r in rows], bool)
    batch[FAILURES] = tuple(failures)
    return batch


class _LoadBatch:
    """Picklable ``tasks -> load_batch(load, tasks)`` (what Grain maps over the plan); ``shared``
    (the prefix of the slot names): in a worker process, into a slot of its ring, as a
    :class:`~gmic_jax.data.shared_slots.SharedBatch`."""

    def __init__(self, load: Callable, shared: Optional[str] = None):
        self.load, self.shared = load, shared  # shared: the prefix of the slot names

    def __call__(self, tasks):
        if not self.shared or multiprocessing.parent_process() is None:  # (free-threaded Grain: threads)
            return load_batch(self.load, tasks)
        ring = slots.worker_ring(self.shared)
        try:
            batch = load_batch(self.load, tasks, ring.alloc)
        except BaseException:
            ring.drop()
            raise
        return ring.share(batch)


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """In a worker process: exit at once when the parent process is gone (SIGKILL included)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        wait([parent.sentinel])
        try:
            slots.close_worker_ring(everything=True)  # unlink the slots the parent never mapped
        finally:
            os._exit(1)

    threading.Thread(target=watch, name="gmic-jax-exit-with-parent", daemon=True).start()


def _grain():
    # Grain imports JAX (~2 s): imported here, when batches are loaded, so that what else this
    # module holds (default_workers, Failure; imported by train.defaults, hence by every config)
    # stays light.
    import grain

    if not flags.FLAGS.is_parsed():  # Grain reads absl flags (here and in its workers); take defaults
        flags.FLAGS.mark_as_parsed()
    return grain


def load_batches(
    plan: Sequence[Sequence],
    load: Callable,
    *,
    workers: int = 0,
    start: int = 0,
    buffer: int = 2,
    put: Optional[Callable] = None,
    device_buffer: int = 2,
):
    """Iterator over ``load_batch(load, plan[k])`` for k = start, start + 1, ... in order.

    ``workers`` = 0 loads in this process (one prefetch thread), N > 0 in N worker processes,
    each keeping up to ``buffer`` batches ready. With ``put`` (host array -> device array) a
    thread also puts the device keys of the next ``device_buffer`` batches on device ahead of
    use. Errors are raised in the consumer. Close the iterator (``.close()``) when done: it stops
    the threads and the worker processes."""
    grain = _grain()
    if workers < 0:
        raise ValueError(f"workers={workers}; expected 0 (in this process) or more")
    ds = grain.MapDataset.source(plan)
    if start:
        ds = ds[start:]
    opener = slots.OpenBatches() if workers else None
    ds = ds.map(_LoadBatch(load, shared=opener.prefix if opener else None))
    # In-process: one thread loads ahead; in worker processes each worker loads in its main thread.
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=0 if workers else 1, prefetch_buffer_size=0 if workers else buffer)
    )
    if workers:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer),
            worker_init_fn=_exit_with_parent,
        )
        ds = ds.map(opener)  # here, in the thread that takes the batches
    if put is not None:
        ds = grain.experimental.ThreadPrefetchIterDataset(
            ds.map(functools.partial(device_put_batch, put=put)), prefetch_buffer_size=device_buffer
        )
    return Batches(iter(ds), opener)


def _wait_for_shared_memory_release() -> None:
    """Wait until Grain's background thread has unlinked the shared memory of freed batches (else
    a process that exits right after training leaves them to the resource tracker, which warns)."""
    try:  # a private module of Grain: absent from other versions
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

        pool = SharedMemoryArray._del_thread_pool  # one thread, first in first out
    except (ImportError, AttributeError):
        return
    if pool is not None:
        pool.apply(int)  # returns once the unlinks queued before it are done


class Batches:
    """The iterator :func:`load_batches` returns; also a context manager that closes it."""

    def __init__(self, iterator, opener: Optional[slots.OpenBatches] = None):
        self._it = iterator
        self._opener = opener

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            raise StopIteration
        return next(self._it)

    def close(self) -> None:
        """Stop the threads and worker processes; batches not yet consumed are released (their
        shared memory unlinked) now, not at interpreter exit."""
        if self._it is None:
            return
        self._it.close()
        self._it = None
        if self._opener is not None:
            self._opener.close()
        gc.collect()  # Grain's iterators hold reference cycles; free them (and their buffers) now
        _wait_for_shared_memory_release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def device_put_batch(batch: dict, put: Callable) -> dict:
    """``batch`` with its device keys (image, label, mask) replaced by ``put(array)``."""
    out = dict(batch)
    for key, value in batch_lib.device_arrays(batch).items():
        out[key] = put(value)
    return out
