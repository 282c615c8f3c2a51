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
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import multiprocessing
import os
import threading
from typing import Any, Callable, Optional, Sequence

import numpy as np

from gmic_jax.data import batch as batch_lib

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
    """Worker processes by default: the cores this process may use less one (for the training loop
    itself), at most 16, and 0 (load in this process) when that leaves fewer than two: a single
    worker only adds the transfer of each batch (measured: never faster than loading in process,
    benchmarks/RESULTS.md)."""
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
    from gmic_jax.data.image import DataError

    if isinstance(error, DataError):  # its text is already "<file>: <problem>"
        return Failure(row, task, str(error), error.path, error.problem)
    problem = f"{type(error).__name__}: {error}"
    return Failure(row, task, f"example {task!r}: {problem}", None, problem)


def load_batch(load: Callable, tasks: Sequence, shared: bool = False) -> dict:
    """The examples of ``tasks`` stacked into one batch, failures as values (see the module doc).

    Keys: the batch layout's (those the examples have), ``ok`` (n,) bool and ``failures`` (a tuple
    of :class:`Failure`). When every task fails only ``ok`` and ``failures`` are present.
    ``shared``: stack numeric arrays straight into shared memory (in a worker process: Grain then
    hands them to the consumer without another copy)."""
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
        filled = [blank if r is None else r for r in rows]
        batch = {k: _stack([r[k] for r in filled], shared) for k in good}
    batch[OK] = np.array([r is not None for r in rows], bool)
    batch[FAILURES] = tuple(failures)
    return batch


ALIGNMENT = 64  # bytes: what XLA:CPU needs to use a host array in place (no copy on device_put)


def _stack(values: list, shared: bool) -> np.ndarray:
    """``np.stack(values)``; numeric arrays into shared memory (``shared``) or an aligned buffer."""
    first = np.asarray(values[0])
    if first.dtype.kind not in "biuf":
        return np.stack([np.asarray(v) for v in values])
    shape = (len(values),) + first.shape
    if shared:
        from grain.multiprocessing import SharedMemoryArray

        out = SharedMemoryArray(shape, first.dtype)  # page-aligned
    else:
        nbytes = int(np.prod(shape)) * first.dtype.itemsize
        raw = np.empty(nbytes + ALIGNMENT, np.uint8)
        offset = -raw.ctypes.data % ALIGNMENT
        out = raw[offset : offset + nbytes].view(first.dtype).reshape(shape)
    np.stack([np.asarray(v) for v in values], out=out)
    return out


class _LoadBatch:
    """Picklable ``tasks -> load_batch(load, tasks)`` (what Grain maps over the plan)."""

    def __init__(self, load: Callable, shared: bool = False):
        self.load, self.shared = load, shared

    def __call__(self, tasks) -> dict:
        return load_batch(self.load, tasks, self.shared)


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """In a worker process: exit at once when the parent process is gone (SIGKILL included)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        from multiprocessing.connection import wait

        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="gmic-jax-exit-with-parent", daemon=True).start()


def _grain():
    import grain
    from absl import flags

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
    ds = ds.map(_LoadBatch(load, shared=workers > 0))
    # In-process: one thread loads ahead; in worker processes each worker loads in its main thread.
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=0 if workers else 1, prefetch_buffer_size=0 if workers else buffer)
    )
    if workers:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer),
            worker_init_fn=_exit_with_parent,
        )
    if put is not None:
        from grain.experimental import ThreadPrefetchIterDataset

        ds = ThreadPrefetchIterDataset(
            ds.map(functools.partial(device_put_batch, put=put)), prefetch_buffer_size=device_buffer
        )
    return Batches(iter(ds))


def _wait_for_shared_memory_release() -> None:
    """Wait until Grain's background thread has unlinked the shared memory of freed batches (else
    a process that exits right after training leaves them to the resource tracker, which warns)."""
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

        pool = SharedMemoryArray._del_thread_pool  # one thread, first in first out
    except (ImportError, AttributeError):
        return
    if pool is not None:
        pool.apply(int)  # returns once the unlinks queued before it are done


class Batches:
    """The iterator :func:`load_batches` returns; also a context manager that closes it."""

    def __init__(self, iterator):
        self._it = iterator

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
