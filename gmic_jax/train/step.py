"""Data-parallel training and evaluation steps.

Each step is a per-device program under ``jax.shard_map`` over a 1-D mesh whose ``data`` axis spans
every device of every process: the global batch is split over the devices, gradients are averaged
with ``lax.pmean`` over ``data`` and every device applies the same Adam update to its replica.

Batch normalisation (``batch_norm``):

* ``'local'`` -- statistics of each device's part of the batch, as under ``pmap``; the running
  averages are then averaged over devices so the replicas stay identical;
* ``'sync'``  -- statistics of the whole global batch (``axis_name='data'`` in every BatchNorm):
  the step equals the single-device step on the same global batch;
* ``'frozen'`` -- the running statistics are used and not updated (the whole model runs in
  inference mode, which also turns off training-time crop rotation).

Images arrive as the data sources give them (raw values) and are normalised and augmented on
device; with window noise the host sends each draw's band of the cached context and its crop
borders, and :func:`make_window_fn` crops and resizes them to the windows on the device first
(:mod:`gmic_jax.resample`). Each example's
augmentation key is ``fold_in(key, position in the global batch)``, so it does not depend on the
number of devices. A non-finite loss or gradient leaves the state
unchanged and is reported in the step's metrics (``finite``); the loop stops on it.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gmic_jax.augment import AugmentConfig, augment_batch
from gmic_jax.config import GMICConfig
from gmic_jax.models import GMIC
from gmic_jax.preprocessing import normalize_images
from gmic_jax.resample import crop_resize
from gmic_jax.train.defaults import GAP_MARGIN, GAP_WEIGHT
from gmic_jax.train.heads import HEAD_OUTPUTS
from gmic_jax.train.loss import gmic_loss
from gmic_jax.train.state import TrainState

DATA_AXIS = "data"
BATCH_NORM_MODES = ("local", "sync", "frozen")
EVAL_OUTPUTS = (*HEAD_OUTPUTS, "saliency_map", "patch_locations")


def make_mesh(devices=None) -> Mesh:
    """1-D mesh over all devices of all processes (or the given ones), axis ``data``."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicate(tree, mesh: Mesh):
    """Place a host pytree on every device of the mesh (works across processes)."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def shard_array(local_rows, mesh: Mesh) -> jax.Array:
    """This process's rows of a global array -> the global array split over ``data``."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(DATA_AXIS)), np.asarray(local_rows))


def shard_batch(local_batch: Mapping, mesh: Mesh) -> dict:
    """This process's rows of the global batch -> global arrays split over ``data``."""
    return {k: shard_array(v, mesh) for k, v in local_batch.items()}


def _example_keys(key, n_local):
    position = lax.axis_index(DATA_AXIS) * n_local + jnp.arange(n_local)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(position)


def make_train_step(
    model_config: GMICConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    beta: float,
    saliency_reduction: str = "sum",
    batch_norm: str = "local",
    augment: AugmentConfig | None = None,
    normalization: str = "standardize",
    gap_weight: float = GAP_WEIGHT,
    gap_margin: float = GAP_MARGIN,
    with_patch_locations: bool = False,
):
    """jit-compiled ``(state, batch) -> (state, metrics)``; ``batch`` holds global arrays
    ``image`` (N, H, W, 1) and ``label`` (N, 2) split over the mesh (see :func:`shard_batch`;
    with window noise the images :func:`make_window_fn` made on the device).
    The old state is donated. ``with_patch_locations`` adds the global batch's ``patch_locations``
    (N, K, 2) to the metrics: which crops the local network was trained on at this step."""
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"batch_norm={batch_norm!r}; expected one of {BATCH_NORM_MODES}")
    model = GMIC(model_config, bn_axis_name=DATA_AXIS if batch_norm == "sync" else None)
    train_mode = batch_norm != "frozen"

    def per_device(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        aug_key, roi_key = jax.random.split(key)
        x = normalize_images(batch["image"], normalization)
        if augment is not None:
            x = augment_batch(_example_keys(aug_key, x.shape[0]), x, augment)
        roi_key = jax.random.fold_in(roi_key, lax.axis_index(DATA_AXIS))
        labels = batch["label"].astype(jnp.float32)

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            if train_mode:
                out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"roi": roi_key})
                new_stats = updates["batch_stats"]
            else:
                out, new_stats = model.apply(variables, x, train=False, rngs={"roi": roi_key}), state.batch_stats
            loss, parts = gmic_loss(out, labels, beta, saliency_reduction, gap_weight=gap_weight, gap_margin=gap_margin)
            return loss, (new_stats, parts, out["patch_locations"])

        (loss, (new_stats, parts, locations)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = lax.pmean(grads, DATA_AXIS)
        loss, parts = lax.pmean((loss, parts), DATA_AXIS)
        if batch_norm == "local":
            new_stats = lax.pmean(new_stats, DATA_AXIS)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
        # A non-finite step changes nothing: the loop stops on `finite` with the last good state.
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **parts}
        if with_patch_locations:
            metrics["patch_locations"] = lax.all_gather(locations, DATA_AXIS, tiled=True)
        return new, metrics

    # check_vma=False: pmap semantics. Each device differentiates its own loss (no implicit psum of
    # the replicated parameters' cotangents); the explicit pmean makes the global-batch mean.
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()), check_vma=False)
    return jax.jit(sharded, donate_argnums=(0,))


def make_window_fn(window_shape, mesh: Mesh):
    """jit-compiled ``batch -> batch``: a window-noise batch's ``region`` (N, h, w) and ``borders``
    (N, 4), split over ``data``, replaced by its ``image`` (N, H, W, 1) float32 windows, each
    device cropping and resizing its own rows (:func:`gmic_jax.resample.crop_resize`); other keys
    pass through.

    A program of its own, dispatched before the training step and feeding it on the device (no
    host in between): inside the step, XLA:CPU compiled the network more slowly for a computed
    image than for one that arrives as an argument (step 1.15x at 1472 x 960, 1.5x at 2944 x 1920,
    where the resize itself is ~3%; benchmarks/RESULTS.md)."""
    window_shape = tuple(int(v) for v in window_shape)

    def per_device(region, borders):
        return crop_resize(region, borders, window_shape)[..., None]

    crop = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS)), out_specs=P(DATA_AXIS)))

    def windows(batch: Mapping) -> dict:
        out = {k: v for k, v in batch.items() if k not in ("region", "borders")}
        out["image"] = crop(batch["region"], batch["borders"])
        return out

    windows.crop = crop  # the compiled program (benchmarks lower it)
    return windows


@functools.lru_cache(maxsize=8)  # one compilation per setting, reused by every evaluation
def make_eval_step(
    model_config: GMICConfig,
    mesh: Mesh,
    *,
    normalization: str = "standardize",
    augment: AugmentConfig | None = None,
    tta_draws: int = 0,
):
    """jit-compiled ``(variables, images, index, key) -> outputs`` (inference mode), split over
    ``data``; ``index`` (N,) int32 is each image's position in the data source and ``key`` raw
    uint32 key data (``jax.random.key_data``).

    Returns the model's ``EVAL_OUTPUTS`` of the un-augmented images; with ``tta_draws`` > 0 the three
    predictions are instead the mean over that many augmented draws (test-time augmentation),
    while the saliency maps and patches stay those of the un-augmented image (they must align
    with its masks). Draw d (0-based) of image ``index`` is augmented with the key
    ``fold_in(fold_in(key, 1 + d), index)``: it depends on the seed, the image and the draw only,
    not on the batch size or the number of devices (validation's ``eval.batch_size`` changes no
    number)."""
    model = GMIC(model_config)

    def per_device(variables, images, index, key):
        key = jax.random.wrap_key_data(key)
        x = normalize_images(images, normalization)
        roi_key = jax.random.fold_in(key, lax.axis_index(DATA_AXIS))
        out = model.apply(variables, x, train=False, rngs={"roi": roi_key})
        out = {k: out[k] for k in EVAL_OUTPUTS}
        if tta_draws and augment is not None:

            def draw(i, acc):
                k = jax.random.fold_in(key, 1 + i)
                xa = augment_batch(jax.vmap(lambda j: jax.random.fold_in(k, j))(index), x, augment)
                o = model.apply(variables, xa, train=False, rngs={"roi": jax.random.fold_in(roi_key, 1 + i)})
                return tuple(a + o[h] for a, h in zip(acc, HEAD_OUTPUTS))

            zeros = tuple(jnp.zeros_like(out[h]) for h in HEAD_OUTPUTS)
            sums = lax.fori_loop(0, tta_draws, draw, zeros)
            for h, s in zip(HEAD_OUTPUTS, sums):
                out[h] = s / tta_draws
        return out

    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P()), out_specs=P(DATA_AXIS), check_vma=False
    )
    return jax.jit(sharded)


def local_copy(tree):
    """Replicated global arrays -> numpy, from this process's own copy (works across processes)."""
    return jax.tree.map(
        lambda x: np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array) else np.asarray(x), tree
    )


def to_host(tree):
    """Global arrays -> numpy on this process (gathered from all processes when there are several)."""
    if jax.process_count() > 1:
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, tree)
