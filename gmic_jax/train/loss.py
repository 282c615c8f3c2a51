"""GMIC's training loss (paper Eq. 12-13), with the reduction pinned.

    L = sum over heads h in (y_global, y_local, y_fusion) of BCE(y_h, y)
        + beta * L_reg(A)

* BCE of one head is averaged over the batch and both classes (PyTorch's ``BCELoss()`` default,
  as the reference fixture's ``grad_loss``); log-probabilities are clamped at -100 as PyTorch does,
  so a saturated prediction gives a finite loss and a zero (not NaN) gradient.
* L_reg(A) = sum over the grid and both classes of |A|, averaged over the batch (Eq. 12);
  ``saliency_reduction='mean'`` averages over the grid and classes instead (the same up to a
  factor h*w*2, which makes beta independent of the image size).

Everything is computed in float32, whatever the model's compute dtype.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp

HEADS = ("y_global", "y_local", "y_fusion")
SALIENCY_REDUCTIONS = ("sum", "mean")
_LOG_FLOOR = -100.0


def _clamped_log(p):
    """log(p) clamped at -100 with a finite gradient everywhere (also at p == 0)."""
    positive = p > 0
    safe = jnp.where(positive, p, 1.0)
    return jnp.where(positive, jnp.maximum(jnp.log(safe), _LOG_FLOOR), _LOG_FLOOR)


def binary_cross_entropy(probs, targets):
    """Element-wise BCE of probabilities against {0, 1} (or soft) targets, float32."""
    p = jnp.asarray(probs, jnp.float32)
    y = jnp.asarray(targets, jnp.float32)
    return -(y * _clamped_log(p) + (1.0 - y) * _clamped_log(1.0 - p))


def saliency_regularizer(saliency_map, reduction: str = "sum"):
    """L_reg(A) averaged over the batch; A is (N, h, w, 2)."""
    if reduction not in SALIENCY_REDUCTIONS:
        raise ValueError(f"saliency reduction {reduction!r}; expected one of {SALIENCY_REDUCTIONS}")
    a = jnp.abs(jnp.asarray(saliency_map, jnp.float32)).reshape(saliency_map.shape[0], -1)
    per_image = a.sum(axis=1) if reduction == "sum" else a.mean(axis=1)
    return per_image.mean()


def gmic_loss(outputs: Mapping, labels, beta: float, saliency_reduction: str = "sum",
              heads: Sequence[str] = HEADS):
    """(total loss, dict of its parts) for GMIC's output dict and (N, 2) labels [benign, malignant]."""
    parts = {f"bce_{h}": binary_cross_entropy(outputs[h], labels).mean() for h in heads}
    parts["saliency_reg"] = saliency_regularizer(outputs["saliency_map"], saliency_reduction)
    total = sum(parts[f"bce_{h}"] for h in heads) + beta * parts["saliency_reg"]
    return total, parts
