"""GMIC: global network -> saliency maps -> y_global; retrieve_roi -> patches -> local network
-> gated attention -> y_local; fusion of max-pooled h_g with z -> y_fusion.

    out = GMIC(cfg).apply(variables, x, train=False)       # x: (N, H, W, 1) float32
    out, updates = GMIC(cfg).apply(variables, x, train=True, mutable=['batch_stats'],
                                   rngs={'roi': key})

`out` is a plain dict of named outputs (paper's names); see `GMIC.__call__`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from gmic_jax.config import GMICConfig
from gmic_jax.models.attention import ATTENTIONS
from gmic_jax.models.global_net import ResNet22, SaliencyHead
from gmic_jax.models.layers import compute_dtype, spatial_max
from gmic_jax.models.local_net import LOCAL_NETWORKS
from gmic_jax.models.pooling import aggregate
from gmic_jax.models.roi import extract_patches, random_patch_locations, retrieve_roi, rotate_patches

NUM_CLASSES = 2  # [benign, malignant]


class GMIC(nn.Module):
    config: GMICConfig = GMICConfig()
    # Synchronise BatchNorm statistics over this mapped axis in training (None: per device).
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != 1 or tuple(x.shape[1:3]) != cfg.image_shape:
            raise ValueError(
                f"GMIC expects images of shape (N, {cfg.image_shape[0]}, {cfg.image_shape[1]}, 1), got "
                f"{tuple(x.shape)}; set GMICConfig(image_shape=(H, W)) for another image size"
            )
        n, H, W, _ = x.shape
        dtype = compute_dtype(cfg.dtype)
        x = x.astype(jnp.float32)

        # Global network: h_g and the saliency maps A; y_global by the chosen aggregation.
        global_net = ResNet22(
            dtype=dtype,
            stage_strides=cfg.global_strides,
            stage_blocks=cfg.global_blocks,
            stage_features=cfg.global_widths,
            stage_kernels=cfg.global_kernels,
            remat=cfg.remat,
            bn_axis_name=self.bn_axis_name,
            name="ds_net",
        )
        if cfg.saliency_symmetry == "rot180":  # both turns in one batch; see GMICConfig.saliency_symmetry
            both = global_net(jnp.concatenate([x, x[:, ::-1, ::-1]]), train)
            h_g = 0.5 * (both[:n] + both[n:, ::-1, ::-1])
        else:
            h_g = global_net(x, train)
        saliency_logits = SaliencyHead(NUM_CLASSES, name="left_postprocess_net")(h_g)
        saliency_map = jax.nn.sigmoid(saliency_logits)
        y_global = aggregate(saliency_map, cfg.aggregation, cfg.percent_t)

        # Patch selection (discrete: no gradient) and crops cut from the full-resolution input. The
        # named scopes label their ops in the compiled program (benchmarks attribute kernels by them).
        with jax.named_scope("retrieve_roi"):
            if cfg.patch_selection == "retrieve_roi":
                patch_locations, _ = retrieve_roi(saliency_map, (H, W), cfg.crop_shape, cfg.K)
            else:
                patch_locations = random_patch_locations(self.make_rng("roi"), n, (H, W), cfg.crop_shape, cfg.K)
            patch_locations = jax.lax.stop_gradient(patch_locations)
        with jax.named_scope("extract_patches"):
            patches = extract_patches(x[..., 0], patch_locations, cfg.crop_shape)
            if train and cfg.rotate_crops:
                patches = rotate_patches(self.make_rng("roi"), patches)

        # Local network on all N*K patches at once, then MIL pooling.
        ch, cw = cfg.crop_shape
        local_net = LOCAL_NETWORKS[cfg.local_net](
            dtype=dtype, bn_axis_name=self.bn_axis_name, remat=cfg.remat, name="dn_resnet"
        )
        h_crops = local_net(patches.reshape(n * cfg.K, ch, cw, 1), train).reshape(n, cfg.K, -1)
        z, patch_attns = ATTENTIONS[cfg.attention](name="attention")(h_crops)

        def dense(name, bias):
            return nn.Dense(NUM_CLASSES, use_bias=bias, dtype=jnp.float32, param_dtype=jnp.float32, name=name)

        y_local = jax.nn.sigmoid(dense("classifier_linear", False)(z))
        global_vec = spatial_max(h_g)
        y_fusion = jax.nn.sigmoid(dense("fusion_dnn", True)(jnp.concatenate([global_vec, z], axis=-1)))

        return {
            "y_global": y_global,
            "y_local": y_local,
            "y_fusion": y_fusion,
            "saliency_map": saliency_map,
            "saliency_logits": saliency_logits,
            "patch_locations": patch_locations,
            "patch_attns": patch_attns,
            "patches": patches,
            "h_crops": h_crops,
            "h_g": h_g,
            "global_vec": global_vec,
            "z": z,
        }


def init_variables(config: GMICConfig, rng):
    """Parameters and batch statistics of GMIC(config). They do not depend on the image size, so
    this initialises on a small image (a full-size init costs seconds of compile), in one jitted
    call (the same values as eager init, in about half the time of its op-by-op dispatch), compiled
    once per model config and process."""
    return _jitted_init(config.replace(image_shape=(256, 256)))(rng)


@functools.lru_cache(maxsize=16)
def _jitted_init(small: GMICConfig):
    def init(key):
        params_rng, roi_rng = jax.random.split(key)
        x = jnp.zeros((1, *small.image_shape, 1), jnp.float32)
        return GMIC(small).init({"params": params_rng, "roi": roi_rng}, x, train=False)

    return jax.jit(init)
