"""MIL pooling of the patch representations h_k into z: gated attention (the paper's) or uniform."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class GatedAttention(nn.Module):
    """alpha = softmax_k(w^T (sigmoid(U h_k) * tanh(V h_k))); z = sum_k alpha_k h_k.

    h_crops: (N, K, L) -> (z (N, L), patch_attns (N, K)), float32.
    """

    hidden: int = 128

    @nn.compact
    def __call__(self, h_crops):
        h = h_crops.astype(jnp.float32)

        def dense(n, name):
            return nn.Dense(n, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, name=name)

        gated = jax.nn.sigmoid(dense(self.hidden, "mil_attn_U")(h)) * jnp.tanh(dense(self.hidden, "mil_attn_V")(h))
        scores = dense(1, "mil_attn_w")(gated)[..., 0]
        alpha = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("nk,nkl->nl", alpha, h), alpha


class UniformAttention(nn.Module):
    """Ablation: every patch weighs 1/K."""

    @nn.compact
    def __call__(self, h_crops):
        h = h_crops.astype(jnp.float32)
        n, k, _ = h.shape
        alpha = jnp.full((n, k), 1.0 / k, jnp.float32)
        return jnp.mean(h, axis=1), alpha


ATTENTIONS = {"gated": GatedAttention, "uniform": UniformAttention}
