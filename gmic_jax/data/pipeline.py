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
  ``close()`` leaves no shared memory behind.
"""

from __future__ import annotations

import _posixshmem  # what multiprocessing.shared_memory uses (POSIX)
import dataclasses
import functools
import gc
import mmap
import multiprocessing
import os
import secrets
import threading
import weakref
from multiprocessing import resource_tracker, shared_memory, util
from multiprocessing.connection import wait
from typing import Any, Callable, Optional, Sequence

import numpy as np
from absl import flags

from gmic_jax.data import batch as batch_lib
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
    into (in a worker process: a reused shared-memory slot for the big ones, :class:`_Ring`; a key
    it leaves out is stacked into a fresh array); by default fresh 64-byte-aligned buffers."""
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
        out = (alloc or _aligned_arrays)(numeric)
        batch = {k: np.stack(v, out=out[k]) if k in out else np.stack(v) for k, v in columns.items()}
    batch[OK] = np.array([r is not None for r in rows], bool)
    batch[FAILURES] = tuple(failures)
    return batch


ALIGNMENT = 64  # bytes: what XLA:CPU needs to use a host array in place (no copy on device_put)


def _layout(specs: dict) -> tuple[dict, int]:
    """Offsets of the arrays ``specs`` ({key: (shape, dtype)}) in one block, each ALIGNMENT-aligned
    after a header of ALIGNMENT bytes, and the block's size."""
    offsets, end = {}, ALIGNMENT
    for key, (shape, dtype) in specs.items():
        offsets[key] = end
        end += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // ALIGNMENT) * ALIGNMENT
    return offsets, end


def _aligned_arrays(specs: dict) -> dict:
    """Fresh ALIGNMENT-aligned arrays of ``specs`` ({key: (shape, dtype)}), each its own buffer."""
    out = {}
    for key, (shape, dtype) in specs.items():
        raw = np.empty(int(np.prod(shape)) * np.dtype(dtype).itemsize + ALIGNMENT, np.uint8)
        out[key] = np.ndarray(shape, dtype, raw.data, -raw.ctypes.data % ALIGNMENT)
    return out


# Worker processes stack each batch into a *slot*: a shared-memory segment they keep and reuse, so
# that a batch costs one write of its bytes. A fresh segment per batch costs ~10x that: every page
# is faulted in (allocated and zeroed) when first written, and freed again when the consumer drops
# the batch (2944 x 1920 uint16 windows, batches of 4: 32 ms instead of 3 ms per batch; RESULTS.md).
#
# Only arrays of SLOT_MIN_BYTES or more go into the slot (the image, masks); smaller ones (labels)
# travel in the message, so a consumer that keeps those does not keep the slot busy. A consumer
# that keeps a big array (or a view of it) keeps its slot: copy what outlives the batch.
#
# The first ALIGNMENT bytes of a slot hold its flag (int32): the worker sets it (busy) before it
# sends the slot's batch, the consumer clears it when the last array of that batch is gone (a
# weakref finalizer on the :class:`_SlotView` every array of the batch is a view of). The worker
# writes only into slots whose flag is clear, so a batch the consumer (or a device put of it) still
# references is never overwritten; when no slot is free it creates one (no waiting, no deadlock:
# the slots are as many as the batches in flight). Names (SLOT_PREFIX, the consumer's pid, a token
# of the pipeline, a random part): the consumer unlinks a segment as soon as it has mapped it (the
# memory lives on in both mappings). A worker that stops (Grain stops it as soon as its part of the
# plan is read, while its last batches may still wait in the consumer's buffers) unlinks only its
# free slots; the consumer's close() unlinks what is left of its pipeline (batches never taken);
# a worker whose parent is gone unlinks all of its slots. The resource tracker that the processes
# share sees each registration matched by one unregistration.


SLOT_MIN_BYTES = 4096  # a page
SLOT_PREFIX = "gmicjax"  # slot names: SLOT_PREFIX, the pid of the process that takes the batches, "_", ...


def _slot_names(prefix: str) -> list:
    """The slots (shared-memory names) starting with ``prefix`` (Linux: /dev/shm; else none)."""
    try:
        return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    except OSError:
        return []


class _Slot:
    """Worker side: one shared-memory segment (header + a batch)."""

    def __init__(self, size: int, prefix: str):
        while True:
            try:
                name = prefix + secrets.token_hex(3)
                self.shm = shared_memory.SharedMemory(name, create=True, size=size)
                break
            except FileExistsError:
                continue
        self.size = size
        self.flag = np.ndarray((1,), np.int32, self.shm.buf)

    def arrays(self, specs: dict, offsets: dict) -> dict:
        return {k: np.ndarray(shape, dtype, self.shm.buf, offsets[k]) for k, (shape, dtype) in specs.items()}

    def close(self, unlink: bool = True) -> None:
        """Unmap; ``unlink``: also the name, unless the consumer already has."""
        self.flag = None
        try:
            self.shm.close()
        except BufferError:  # a view of it is still referenced (an exception's traceback): unmapped at exit
            pass
        if unlink:
            try:
                self.shm.unlink()  # also unregisters it from the resource tracker
            except FileNotFoundError:
                pass


@dataclasses.dataclass(frozen=True)
class _SharedBatch:
    """What a worker sends for a batch: where its numeric arrays are in slot ``name`` (key, offset,
    shape, dtype), its other values, its keys in order; ``retired``: slots this worker has dropped
    since its last batch (the consumer unmaps them)."""

    name: str
    arrays: tuple
    rest: dict
    keys: tuple
    retired: tuple = ()


class _Ring:
    """Worker side: the slots of this worker process (one ring per process, :func:`_worker_ring`)."""

    def __init__(self, prefix: str):
        self.prefix = prefix  # of the names of its slots (the pipeline's)
        self.slots: list = []
        self.retired: list = []
        self.current: Optional[tuple] = None  # (slot, {key: (array, offset)}) of the batch being stacked

    def alloc(self, specs: dict) -> dict:
        """Arrays for the big ones of ``specs`` in a free slot (the smallest that fits; else a new
        one), marked busy."""
        specs = {k: v for k, v in specs.items() if int(np.prod(v[0])) * np.dtype(v[1]).itemsize >= SLOT_MIN_BYTES}
        if not specs:
            return {}
        offsets, size = _layout(specs)
        free = [s for s in self.slots if s.flag[0] == 0]
        fits = [s for s in free if s.size >= size]
        if fits:
            slot = min(fits, key=lambda s: s.size)
        else:
            if free:  # too small for this batch (e.g. a new key): replace one free slot, not add one
                old = free[0]
                self.slots.remove(old)
                self.retired.append(old.shm.name)
                old.close()
            slot = _Slot(size, self.prefix)
            self.slots.append(slot)
        slot.flag[0] = 1
        arrays = slot.arrays(specs, offsets)
        self.current = (slot, {k: (a, offsets[k]) for k, a in arrays.items()})
        return arrays

    def share(self, batch: dict) -> Any:
        """``batch`` (its numeric arrays in the current slot) as the :class:`_SharedBatch` to send."""
        if self.current is None:  # every task failed: nothing numeric to share
            return batch
        (slot, stacked), self.current = self.current, None
        arrays, rest = [], {}
        for key, value in batch.items():
            if key in stacked and value is stacked[key][0]:
                arrays.append((key, stacked[key][1], value.shape, value.dtype.str))
            else:
                rest[key] = value
        retired, self.retired = tuple(self.retired), []
        return _SharedBatch(slot.shm.name, tuple(arrays), rest, tuple(batch), retired)

    def drop(self) -> None:
        """The batch being stacked will not be sent (its load raised): its slot is free again."""
        if self.current is not None:
            self.current[0].flag[0] = 0
            self.current = None

    def close(self, everything: bool = False) -> None:
        """Unmap the slots; unlink the free ones (``everything``: all, the consumer being gone)."""
        for slot in self.slots:
            slot.close(unlink=everything or slot.flag[0] == 0)
        self.slots = []


_RING: Optional[_Ring] = None


def _worker_ring(prefix: str) -> _Ring:
    """This worker process's ring (slot names starting with ``prefix``), closed as it exits."""
    global _RING
    if _RING is None:
        _RING = _Ring(prefix)
        util.Finalize(None, _close_worker_ring, exitpriority=100)  # run as a worker process exits
    return _RING


def _close_worker_ring(everything: bool = False) -> None:
    ring = _RING
    if ring is not None:
        ring.close(everything)


class _SlotView(np.ndarray):
    """Consumer side: one batch's view of a slot. Every array of the batch is a view of it (numpy
    ends a view's base chain at an array of another type), so it is freed with the last of them."""


class _OpenBatches:
    """Consumer side: :class:`_SharedBatch` -> the batch, its arrays views of the slot; the slots
    are mapped once each (the first time they come) and kept mapped until :meth:`close`."""

    def __init__(self):
        self.prefix = f"{SLOT_PREFIX}{os.getpid()}_{secrets.token_hex(3)}_"  # of its workers' slots
        self._maps: dict = {}  # slot name -> (mmap, its flag)

    def _map(self, name: str):
        if name not in self._maps:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
            try:
                memory = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            _posixshmem.shm_unlink("/" + name)  # mapped here and in the worker: the name is no longer needed
            resource_tracker.unregister("/" + name, "shared_memory")  # the worker registered it
            self._maps[name] = (memory, np.ndarray((1,), np.int32, memory))
        return self._maps[name]

    def __call__(self, element):
        if not isinstance(element, _SharedBatch):
            return element
        for name in element.retired:
            self._maps.pop(name, None)  # unmapped once no batch of it is left
        memory, flag = self._map(element.name)
        view = _SlotView.__new__(_SlotView, (len(memory),), np.uint8, memory)
        weakref.finalize(view, _clear, flag).atexit = False
        batch = dict(element.rest)
        for key, offset, shape, dtype in element.arrays:
            batch[key] = np.ndarray(shape, dtype, view, offset)
        return {k: batch[k] for k in element.keys}

    def close(self) -> None:
        """Once the workers are gone: unlink the slots of batches never taken; unmap the others
        once no batch of them is left."""
        self._maps.clear()
        for name in _slot_names(self.prefix):
            try:
                _posixshmem.shm_unlink("/" + name)
            except FileNotFoundError:
                continue
            resource_tracker.unregister("/" + name, "shared_memory")


def _clear(flag: np.ndarray) -> None:
    flag[0] = 0  # the slot is free: the worker may write its next batch into it


class _LoadBatch:
    """Picklable ``tasks -> load_batch(load, tasks)`` (what Grain maps over the plan); ``shared``
    (the prefix of the slot names): in a worker process, into a slot of its ring, as a
    :class:`_SharedBatch`."""

    def __init__(self, load: Callable, shared: Optional[str] = None):
        self.load, self.shared = load, shared  # shared: the prefix of the slot names

    def __call__(self, tasks):
        if not self.shared or multiprocessing.parent_process() is None:  # (free-threaded Grain: threads)
            return load_batch(self.load, tasks)
        ring = _worker_ring(self.shared)
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
            _close_worker_ring(everything=True)  # unlink the slots the parent never mapped
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
    opener = _OpenBatches() if workers else None
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

    def __init__(self, iterator, opener: Optional[_OpenBatches] = None):
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
