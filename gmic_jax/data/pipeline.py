"""The input pipeline: any random-access source -> Grain -> batches (batch layout) -> device.

    source = CacheSource("cache/train")                  # or manifest_source(...), TfdsSource(...)
    loader = make_loader(source, batch_size=8, shuffle=True, seed=0, worker_count=4)
    for batch in prefetch_to_device(iter(loader), size=2):
        ...   # batch["image"] etc. are jax arrays on device, string keys stay numpy

Sharding: each process reads only its shard of the index space (``shard_index`` /
``shard_count``, defaulting to ``jax.process_index()`` / ``jax.process_count()``), so multi-host
training needs nothing more. ``batch_size`` is per process. Shuffling is seeded and reproducible;
Grain's iterator state (``loader.__iter__().get_state()``) can be checkpointed with the model.
"""
from __future__ import annotations

import collections
import itertools
import queue
import threading
from typing import Iterable, Iterator, Optional

from gmic_jax.data import batch as batch_lib


def _jax_process():
    try:
        import jax
        return jax.process_index(), jax.process_count()
    except Exception:  # no JAX here (e.g. a CPU-only data box)
        return 0, 1


def make_loader(source, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                num_epochs: Optional[int] = 1, worker_count: int = 0, worker_buffer_size: int = 2,
                shard_index: Optional[int] = None, shard_count: Optional[int] = None,
                drop_remainder: bool = True, read_threads: int = 4):
    """A ``grain.DataLoader`` yielding batches (dicts of numpy arrays, batch layout).

    ``worker_count`` > 0 decodes in that many worker processes. ``num_epochs=None`` repeats forever.
    """
    import grain.python as grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags; use their defaults
        flags.FLAGS.mark_as_parsed()
    if shard_index is None or shard_count is None:
        shard_index, shard_count = _jax_process()
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                                         drop_remainder=drop_remainder),
        shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    return grain.DataLoader(
        data_source=source, sampler=sampler,
        operations=[grain.Batch(batch_size=batch_size, drop_remainder=drop_remainder)],
        worker_count=worker_count, worker_buffer_size=worker_buffer_size,
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * batch_size, 16)))


def simple_batches(source, batch_size: int, indices: Optional[Iterable[int]] = None,
                   drop_remainder: bool = False) -> Iterator[dict]:
    """Batches without Grain, in order, in this process (evaluation, tests, machines without Grain)."""
    indices = iter(range(len(source)) if indices is None else indices)
    while True:
        chunk = list(itertools.islice(indices, batch_size))
        if not chunk or (drop_remainder and len(chunk) < batch_size):
            return
        yield batch_lib.stack([source[i] for i in chunk])


def prefetch_to_device(batches: Iterator[dict], size: int = 2, sharding=None) -> Iterator[dict]:
    """Move the numeric keys of each batch to device ahead of use, from a background thread.

    ``sharding`` (e.g. ``NamedSharding(mesh, P('data'))``) is passed to ``jax.device_put``; string
    keys stay as numpy arrays.
    """
    import jax

    def put(batch):
        out = dict(batch)
        for key, value in batch_lib.device_arrays(batch).items():
            out[key] = jax.device_put(value, sharding) if sharding is not None else jax.device_put(value)
        return out

    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    error: collections.deque = collections.deque()

    def producer():
        try:
            for b in batches:
                q.put(put(b))
        except BaseException as e:  # hand the error to the consumer
            error.append(e)
        finally:
            q.put(done)

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    while True:
        item = q.get()
        if item is done:
            if error:
                raise error[0]
            return
        yield item
