"""What training and evaluation feed through the input pipeline (:mod:`gmic_jax.data.pipeline`).

- :class:`TrainPlan` -- step -> this process's rows of that step's global batch, as
  ``(example, epoch)`` tasks: the balanced per-epoch order of :func:`~gmic_jax.train.sampling.epoch_order`
  (the same in every process and every run), cut into global batches of ``batch_size``, of which
  process ``p`` of ``n`` takes rows ``p * batch_size / n`` onwards. The step is the data position:
  a run resumed at step ``s`` (from its checkpoint) reads from ``plan[s]`` on, so a killed and
  restarted run sees exactly the batches an uninterrupted one sees, whatever the number of workers.
- :class:`TrainExamples` -- task -> {image, label}: the plain window, or with window noise the
  draw fixed by ``(seed, epoch, example)`` as {region, borders, label}: the host ships the part of
  the cached context that holds the drawn crop, cropped and resized on the device before the step
  (:meth:`~gmic_jax.data.cache.CacheSource.noisy_region`).
- :func:`eval_plan` -- the validation/evaluation batches in source order, the last one padded by
  repeating its last example (padded rows are dropped from the results).
"""

from __future__ import annotations

import numpy as np

from gmic_jax.train.sampling import epoch_order


class TrainPlan:
    """Random access over steps: ``plan[step]`` = this process's ((example, epoch), ...) of ``step``."""

    def __init__(
        self,
        labels,
        *,
        batch_size: int,
        steps_per_epoch: int,
        num_steps: int,
        seed: int,
        balanced: bool,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} must be a multiple of the {process_count} processes")
        self.labels = np.asarray(labels, np.float32)
        self.batch_size, self.steps_per_epoch, self.num_steps = int(batch_size), int(steps_per_epoch), int(num_steps)
        self.seed, self.balanced = int(seed), bool(balanced)
        self.rows = self.batch_size // process_count
        self.first_row = process_index * self.rows
        self._order = (None, None)  # (epoch, its order): one epoch's order at a time

    def __len__(self) -> int:
        return self.num_steps

    def order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.labels, epoch, self.seed, self.balanced))
        return self._order[1]

    def __getitem__(self, step: int) -> tuple:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} out of range for {self.num_steps} steps")
        epoch, j = divmod(int(step), self.steps_per_epoch)
        batch = self.order(epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        return tuple((int(i), epoch) for i in batch[self.first_row : self.first_row + self.rows])


class TrainExamples:
    """Task ``(example, epoch)`` -> what the training step takes of it (picklable): {image, label};
    with window noise {region, borders, label}, the draw of ``(seed, epoch, example)`` that the
    device crops and resizes before the step (:meth:`~gmic_jax.data.cache.CacheSource.noisy_region`,
    :func:`gmic_jax.train.step.make_window_fn`)."""

    def __init__(self, source, *, seed: int, window_noise: bool = False):
        self.source, self.seed, self.window_noise = source, int(seed), bool(window_noise)

    def __call__(self, task) -> dict:
        index, epoch = task
        if self.window_noise:  # a draw per (seed, epoch, example): the same after a resume
            return self.source.noisy_region(index, epoch, self.seed)
        example = self.source[index]
        return {"image": example["image"], "label": example["label"]}


def eval_plan(num_examples: int, batch_size: int) -> list:
    """Batches of example indices in order; the last one padded with its last index."""
    plan = []
    for start in range(0, num_examples, batch_size):
        idx = list(range(start, min(start + batch_size, num_examples)))
        plan.append(tuple(idx + [idx[-1]] * (batch_size - len(idx))))
    return plan
