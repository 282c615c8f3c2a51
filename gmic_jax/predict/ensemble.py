"""predict's checkpoints and its one compiled function.

A checkpoint is any directory :func:`gmic_jax.load_checkpoint` reads; several are an ensemble
whose members must take the same input (window and preprocessing).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gmic_jax.augment import AugmentConfig, augment_batch
from gmic_jax.checkpoint import CheckpointError, Selection, load_selected, read_config
from gmic_jax.config import GMICConfig
from gmic_jax.models import GMIC, init_variables
from gmic_jax.preprocessing import Preprocessing, normalize_images

FORWARD_OUTPUTS = ("saliency_map", "patch_locations", "patch_attns", "patches")


@dataclasses.dataclass
class Model:
    directory: str
    config: GMICConfig
    variables: dict
    preprocessing: Preprocessing
    train_augment: object = None  # the training config's augment section, when config.json records one
    selection: Selection | None = None  # the step loaded and why


def _flat_shapes(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(v)) for path, v in leaves}


@functools.lru_cache(maxsize=16)
def _expected_shapes(config: GMICConfig) -> dict:
    """{'params/ds_net/...': shape} of GMIC(config), traced abstractly (no compute)."""
    expected = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
    return _flat_shapes({k: expected[k] for k in ("params", "batch_stats") if k in expected})


def check_variables(config: GMICConfig, variables, directory) -> None:
    """Raise :class:`CheckpointError` unless ``variables`` have exactly the parameters of GMIC(config)."""
    want = _expected_shapes(config)
    have = _flat_shapes({k: variables[k] for k in ("params", "batch_stats") if k in variables})
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if extra:
            parts.append(f"unexpected {len(extra)} (e.g. {extra[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: {have[k]}, expected {want[k]})")
        raise CheckpointError(
            f"{directory}: the saved parameters are not those of the architecture in its config.json "
            f"(local_net={config.local_net}, crop_shape={list(config.crop_shape)}, K={config.K}): " + "; ".join(parts)
        )


def _input(prep: Preprocessing) -> Preprocessing:
    """What a model takes as input (the synthetic data it was trained on aside)."""
    return dataclasses.replace(prep, synthetic=None)


def load_models(directories: Sequence) -> list:
    """Load and check every checkpoint of an ensemble; raise :class:`CheckpointError` naming the bad one."""
    if not directories:
        raise CheckpointError("no --checkpoint given")
    models = []
    for d in directories:
        try:
            config, variables, selection = load_selected(d)
            _, prep, doc = read_config(d)
        except CheckpointError:
            raise
        except Exception as e:  # orbax errors for missing/corrupt steps
            raise CheckpointError(f"{d}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
        check_variables(config, variables, d)
        train = doc.get("train")
        augment = train.get("augment") if isinstance(train, dict) else None
        try:
            AugmentConfig.from_section(augment)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{d}/config.json: bad train.augment section: {e}") from None
        models.append(Model(str(d), config, variables, prep, augment, selection))
    first = models[0]
    for model in models[1:]:
        shape, prep = model.config.image_shape, _input(model.preprocessing)
        if shape != first.config.image_shape or prep != _input(first.preprocessing):
            raise CheckpointError(
                f"{model.directory}: takes {list(shape)} windows with preprocessing {prep.to_dict()}, but "
                f"{first.directory} takes {list(first.config.image_shape)} "
                f"with {_input(first.preprocessing).to_dict()}; an ensemble needs one input for all its models"
            )
    return models


@functools.lru_cache(maxsize=8)
def compiled_forward(configs: tuple, normalization: str, augment, devices: tuple):
    """The one jit-compiled function of a run (cached per configuration):

    ``(variables_list, images (B, H, W) float32 raw, ids (B, 2) int32, key_data) -> outputs``

    with ``outputs['y_fusion']`` (B, M, 2) of every model and the first model's
    ``FORWARD_OUTPUTS``. ``ids`` = (image hash, draw): rows with draw > 0 are augmented on
    device with ``augment`` when it is given, each from the key
    ``fold_in(fold_in(key, image hash), draw)`` (independent of the batch).
    """
    models = [GMIC(c) for c in configs]
    mesh = Mesh(np.asarray(devices), ("data",))

    def per_device(variables_list, images, ids, key_data):
        x = normalize_images(images[..., None], normalization)
        base = jax.random.wrap_key_data(key_data)
        if augment is not None:
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i[0]), i[1]))(ids)
            x = jnp.where((ids[:, 1] > 0)[:, None, None, None], augment_batch(keys, x, augment), x)
        outs = [model.apply(v, x, train=False, rngs={"roi": base}) for model, v in zip(models, variables_list)]
        result = {k: outs[0][k] for k in FORWARD_OUTPUTS}
        result["y_fusion"] = jnp.stack([o["y_fusion"] for o in outs], axis=1)
        return result

    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P("data"), P("data"), P()), out_specs=P("data"), check_vma=False
    )
    return jax.jit(sharded), mesh
