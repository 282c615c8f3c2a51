"""Rematerialisation policies (`GMICConfig.remat`): which parts of GMIC the backward pass
recomputes instead of keeping their activations, by name.

A policy says, for the global network (f_g) and the local network (f_l), whether the stem
(stem conv + max-pool, plus the local stem's BatchNorm) is recomputed, and in which units the
residual blocks are: one `jax.checkpoint` per block or per stage (two blocks of f_g), keeping
nothing inside a unit or only the convolutions' outputs (`jax.checkpoint_policies.dots_saveable`:
BatchNorm and ReLU are recomputed, the convolutions are not). The names and their one-line
meaning live in `gmic_jax.config.REMAT_POLICIES`; their memory and recompute cost per exam in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax

from gmic_jax.config import REMAT_POLICIES, remat_policy_name


@dataclasses.dataclass(frozen=True)
class RematSpec:
    global_stem: bool = False
    global_blocks: str = ""  # "" (kept), "block" or "stage"
    local_stem: bool = False
    local_blocks: str = ""  # "" (kept) or "block"
    saveable: str = "nothing"  # inside a unit: "nothing" or "convs"


SPECS = {
    "none": RematSpec(),
    "global": RematSpec(global_blocks="block"),
    "global_convs": RematSpec(global_blocks="block", saveable="convs"),
    "global_stages": RematSpec(global_blocks="stage"),
    "global_stem": RematSpec(global_stem=True, global_blocks="block"),
    "local": RematSpec(local_stem=True, local_blocks="block"),
    "all": RematSpec(global_stem=True, global_blocks="block", local_stem=True, local_blocks="block"),
}
assert tuple(SPECS) == tuple(REMAT_POLICIES), "gmic_jax.config.REMAT_POLICIES and SPECS must list the same names"


def remat_spec(remat) -> RematSpec:
    """The spec of a `GMICConfig.remat` value (a policy name, or False / True)."""
    return SPECS[remat_policy_name(remat)]


def jax_policy(saveable: str):
    return {"nothing": None, "convs": jax.checkpoint_policies.dots_saveable}[saveable]


def checkpointed(target, spec: RematSpec, **kw) -> Callable:
    """`nn.remat` of a Module class or of a function taking a module first, with the spec's policy
    of what to keep inside."""
    return nn.remat(target, policy=jax_policy(spec.saveable), **kw)
