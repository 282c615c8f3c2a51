"""Aggregation of the saliency maps into y_global: top-t% pooling and its extremes GMP and GAP."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def top_t_count(h: int, w: int, percent_t: float) -> int:
    """k = int(round(h * w * t)) with Python's round, as the original; at least 1."""
    return max(1, int(round(h * w * percent_t)))


def top_t_percent(saliency_map, percent_t: float):
    """Mean of the k largest values of each class map. (N, h, w, C) -> (N, C), float32."""
    n, h, w, c = saliency_map.shape
    k = top_t_count(h, w, percent_t)
    flat = jnp.moveaxis(saliency_map.astype(jnp.float32), -1, 1).reshape(n, c, h * w)
    if k == h * w:
        return jnp.mean(flat, axis=-1)
    return jnp.mean(lax.top_k(flat, k)[0], axis=-1)


def global_max_pool(saliency_map):
    return jnp.max(saliency_map.astype(jnp.float32), axis=(1, 2))


def global_average_pool(saliency_map):
    return jnp.mean(saliency_map.astype(jnp.float32), axis=(1, 2))


def aggregate(saliency_map, aggregation: str, percent_t: float):
    """y_global from the saliency maps by the named aggregation ('top_t', 'gmp', 'gap')."""
    if aggregation == "top_t":
        return top_t_percent(saliency_map, percent_t)
    if aggregation == "gmp":
        return global_max_pool(saliency_map)
    if aggregation == "gap":
        return global_average_pool(saliency_map)
    raise ValueError(f"unknown aggregation {aggregation!r}; expected 'top_t', 'gmp' or 'gap'")
