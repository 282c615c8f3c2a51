"""Training state (a small pytree) and the optimizer built from the config."""

from __future__ import annotations

from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ("constant", "cosine", "warmup_cosine")


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes. ``rng`` is a raw uint32 (2,) key: the base of
    every per-step key (``fold_in(rng, step)``), so resuming at a step resumes the random stream."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def learning_rate_schedule(cfg: Mapping, total_steps: int):
    """optax schedule from ``cfg`` (learning_rate, schedule, warmup_steps)."""
    lr = float(cfg["learning_rate"])
    kind = cfg.get("schedule", "constant")
    warmup = int(cfg.get("warmup_steps", 0))
    total = max(int(total_steps), 1)
    if kind == "constant":
        return (
            optax.constant_schedule(lr)
            if not warmup
            else optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
        )
    if kind == "cosine":
        return optax.cosine_decay_schedule(lr, total)
    if kind == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(total, warmup + 1))
    raise ValueError(f"optimizer.schedule={kind!r}; expected one of {SCHEDULES}")


def make_optimizer(cfg: Mapping, total_steps: int) -> optax.GradientTransformation:
    """Adam (the paper's optimizer), optional L2 weight decay added to the gradient (PyTorch
    Adam's ``weight_decay``) and optional global-norm clipping."""
    parts = []
    if cfg.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(float(cfg["grad_clip_norm"])))
    if cfg.get("weight_decay"):
        parts.append(optax.add_decayed_weights(float(cfg["weight_decay"])))
    parts.append(
        optax.scale_by_adam(
            b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)), eps=float(cfg.get("eps", 1e-8))
        )
    )
    parts.append(optax.scale_by_learning_rate(learning_rate_schedule(cfg, total_steps)))
    return optax.chain(*parts)


def create_train_state(variables: Mapping, tx: optax.GradientTransformation, seed: int) -> TrainState:
    params = jax.tree.map(jnp.asarray, variables["params"])
    batch_stats = jax.tree.map(jnp.asarray, variables.get("batch_stats", {}))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jnp.asarray(np.asarray(jax.random.key_data(jax.random.key(seed))), jnp.uint32),
    )
