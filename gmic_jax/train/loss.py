"""GMIC's training loss (paper Eq. 12-13), with the reduction pinned.

    L = sum over heads h in (y_global, y_local, y_fusion) of BCE(y_h, y)
        + beta * L_reg(A)

* BCE of one head is averaged over the batch and both classes (PyTorch's ``BCELoss()`` default,
  as the reference fixture's ``grad_loss``); log-probabilities are clamped at -100 as PyTorch does,
  so a saturated prediction gives a finite loss and a zero (not NaN) gradient.
* L_reg(A) = sum over the grid and both classes of |A|, averaged over the batch (Eq. 12);
  ``saliency_reduction='mean'`` averages over the grid and classes instead (the same up to a
  factor h*w*2, which makes beta independent of the image size).

Optional, not in the paper (off in the paper's configs; configs/synthetic.py uses it):
``gap_weight`` > 0 adds gap_weight * BCE(sigmoid(mean of the saliency logits over the grid, centred
over the batch), y) -- a classifier on the global-average-pooled h_g through the saliency head's
own weights (class activation maps, Zhou et al. 2016). Top-t pooling passes y_global's gradient
only to the t% highest cells and the L1 term saturates the others' sigmoids; this term reaches
every cell through its logit, so a finding outside the top t still pulls the head towards its
features (see configs/synthetic.py). An image past ``gap_margin`` on the right side pulls no more.

Everything is computed in float32, whatever the model's compute dtype.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import optax

from gmic_jax.train.defaults import GAP_MARGIN, GAP_WEIGHT
from gmic_jax.train.heads import HEAD_OUTPUTS

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


def gap_bce(saliency_logits, labels, margin: float = GAP_MARGIN):
    """BCE of sigmoid(s) against (N, 2) labels, averaged over the batch and classes, where s is the
    grid mean of an image's (h, w) saliency logits less that mean's average over the batch (per
    class; each device's part of the batch in data-parallel training).

    The head has no bias, so without the centring the decision point would be a grid-mean logit of
    0, which a sparse map never reaches on a positive image: the term raised the findings' logits
    without end (measured: per-image maximum logit 22 on average, maps at exactly 1.0 over ~6
    cells). An image on the right side by more than ``margin`` gets no gradient, so a
    classified image stops growing the head. The default margin, 2, is far more than a sparse map's
    grid mean reaches (a finding covers a few of the cells): on the embedded generator the maps
    still saturated (malignant logits ~10 over a background of -7); configs/synthetic.py uses 0.25
    and says what each margin measured. Computed from the logits (no saturation of the term itself),
    float32."""
    z = jnp.asarray(saliency_logits, jnp.float32).mean(axis=(1, 2))
    z = z - z.mean(axis=0)
    y = jnp.asarray(labels, jnp.float32)
    z = jnp.where(y >= 0.5, jnp.minimum(z, margin), jnp.maximum(z, -margin))
    return optax.sigmoid_binary_cross_entropy(z, y).mean()


def gmic_loss(
    outputs: Mapping,
    labels,
    beta: float,
    saliency_reduction: str = "sum",
    heads: Sequence[str] = HEAD_OUTPUTS,
    gap_weight: float = GAP_WEIGHT,
    gap_margin: float = GAP_MARGIN,
):
    """(total loss, dict of its parts) for GMIC's output dict and (N, 2) labels [benign, malignant]."""
    parts = {f"bce_{h}": binary_cross_entropy(outputs[h], labels).mean() for h in heads}
    parts["saliency_reg"] = saliency_regularizer(outputs["saliency_map"], saliency_reduction)
    total = sum(parts[f"bce_{h}"] for h in heads) + beta * parts["saliency_reg"]
    if gap_weight:
        parts["bce_gap"] = gap_bce(outputs["saliency_logits"], labels, gap_margin)
        total = total + gap_weight * parts["bce_gap"]
    return total, parts
