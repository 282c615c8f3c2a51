"""Shared-memory slots: how the input pipeline's worker processes hand their batches over.

A worker stacks each batch into a *slot* of its :class:`Ring` and sends a :class:`SharedBatch` (where
the arrays are); the consumer's :class:`OpenBatches` maps the slot and gives the batch back as views
of it (:mod:`gmic_jax.data.pipeline` uses both; nothing else needs this module).
"""

from __future__ import annotations

import _posixshmem  # what multiprocessing.shared_memory uses (POSIX)
import dataclasses
import mmap
import os
import secrets
import weakref
from multiprocessing import resource_tracker, shared_memory, util
from typing import Any, Optional

import numpy as np

ALIGNMENT = 64  # bytes: what XLA:CPU needs to use a host array in place (no copy on device_put)


def _layout(specs: dict) -> tuple[dict, int]:
    """Offsets of the arrays ``specs`` ({key: (shape, dtype)}) in one block, each ALIGNMENT-aligned
    after a header of ALIGNMENT bytes, and the block's size."""
    offsets, end = {}, ALIGNMENT
    for key, (shape, dtype) in specs.items():
        offsets[key] = end
        end += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // ALIGNMENT) * ALIGNMENT
    return offsets, end


def aligned_arrays(specs: dict) -> dict:
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
class SharedBatch:
    """What a worker sends for a batch: where its numeric arrays are in slot ``name`` (key, offset,
    shape, dtype), its other values, its keys in order; ``retired``: slots this worker has dropped
    since its last batch (the consumer unmaps them)."""

    name: str
    arrays: tuple
    rest: dict
    keys: tuple
    retired: tuple = ()


class Ring:
    """Worker side: the slots of this worker process (one ring per process, :func:`worker_ring`)."""

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
        """``batch`` (its numeric arrays in the current slot) as the :class:`SharedBatch` to send."""
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
        return SharedBatch(slot.shm.name, tuple(arrays), rest, tuple(batch), retired)

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


_RING: Optional[Ring] = None


def worker_ring(prefix: str) -> Ring:
    """This worker process's ring (slot names starting with ``prefix``), closed as it exits."""
    global _RING
    if _RING is None:
        _RING = Ring(prefix)
        util.Finalize(None, close_worker_ring, exitpriority=100)  # run as a worker process exits
    return _RING


def close_worker_ring(everything: bool = False) -> None:
    ring = _RING
    if ring is not None:
        ring.close(everything)


class _SlotView(np.ndarray):
    """Consumer side: one batch's view of a slot. Every array of the batch is a view of it (numpy
    ends a view's base chain at an array of another type), so it is freed with the last of them."""


class OpenBatches:
    """Consumer side: :class:`SharedBatch` -> the batch, its arrays views of the slot; the slots
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
        if not isinstance(element, SharedBatch):
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
