"""The worker side of memory_fwd_bwd.py: one process per implementation and phase, which loads the
weights and images the parent wrote, compiles (JAX) or builds (PyTorch) the forward or the
training step, reports parameters, FLOPs, compile time and the first step's peak memory, then
answers the parent's "run", "save" and "profile" commands (`bench_common.serve`).
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

import bench_common as bc
import deviceless
import jax
import numpy as np
import profile_summary
import torch_reference as tref

from gmic_jax import GMIC
from gmic_jax.convert import convert_state_dict, variables_to_state_dict
from gmic_jax.models.global_net import saliency_grid_shape
from gmic_jax.xla_flags import apply_cpu_defaults, enable_compile_cache


def _cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0]
    return float(cost["flops"])


def _temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


class JaxRunner:
    def __init__(self, spec: dict):
        self.spec = spec
        if spec.get("precision") == "highest":
            jax.config.update("jax_default_matmul_precision", "highest")
        self.cfg = bc.make_config(spec)
        self.model = GMIC(self.cfg)
        self.dev = jax.devices()[0]
        with np.load(spec["weights"]) as f:
            variables = convert_state_dict({k: f[k] for k in f.files}, self.cfg)
        self.variables = jax.device_put(variables, self.dev)
        self.x = jax.device_put(np.load(spec["input"])[..., None], self.dev)
        self.y = jax.device_put(bc.targets(self.x.shape[0]), self.dev)
        self.rng = jax.random.key(0)
        self.last = None

    def ready(self) -> dict:
        info = {
            "device_kind": self.dev.device_kind,
            "platform": self.dev.platform,
            "params": bc.jax_param_counts(self.variables["params"]),
        }
        if self.spec["phase"] == "fwd":
            fn = jax.jit(lambda v, x, rng: self.model.apply(v, x, train=False, rngs={"roi": rng}))
            self.args = (self.variables, self.x, self.rng)
        else:
            fn = jax.jit(bc.make_grad_fn(self.model, train=True))
            self.args = (self.variables["params"], self.variables["batch_stats"], self.x, self.y, self.rng)
        with bc.CompileCacheEvents() as cache:
            t0 = time.perf_counter()
            lowered = fn.lower(*self.args)
            self.compiled = lowered.compile()
            info["compile_s"] = time.perf_counter() - t0
        info["compile_cache"] = cache.status
        # XLA:CPU's optimised program still counts its convolutions; on GPU they become cuDNN
        # calls that carry no FLOPs (1.4 of 229 GFLOP counted on an H200), so there the
        # program before optimisation is counted, as the deviceless compile does.
        info["flops"] = (
            _cost_flops(self.compiled) if self.dev.platform == "cpu" else deviceless.flops_before_optimization(lowered)
        )
        info["flops_source"] = "XLA cost analysis" + (
            "" if self.dev.platform == "cpu" else " (HLO before optimisation)"
        )
        info["xla_temp_bytes"] = _temp_bytes(self.compiled)
        if self.spec["phase"] == "train":
            info.update(self._first_step_memory())
        return info

    def _first_step_memory(self) -> dict:
        if self.dev.platform == "cpu":
            with bc.ResidentRise() as rise:
                self.last = jax.block_until_ready(self.compiled(*self.args))
            return {
                "peak_mem_bytes": rise.rise,
                "mem_method": f"resident rise ({rise.method})",
                "rss_before_bytes": rise.baseline,
            }
        self.last = jax.block_until_ready(self.compiled(*self.args))
        stats = self.dev.memory_stats() or {}
        return {"peak_mem_bytes": int(stats.get("peak_bytes_in_use", -1)), "mem_method": "peak_bytes_in_use"}

    def handle(self, msg: dict) -> dict:
        if msg["cmd"] == "run":
            t0 = time.perf_counter()
            self.last = jax.block_until_ready(self.compiled(*self.args))
            return {"ms": (time.perf_counter() - t0) * 1e3}
        if msg["cmd"] == "save":
            return {"path": self._save(Path(msg["path"]))}
        if msg["cmd"] == "profile":
            return self._profile(Path(msg["path"]))
        raise ValueError(f"unknown command {msg['cmd']!r}")

    def _save(self, path: Path) -> str:
        if self.spec["phase"] == "fwd":
            out = jax.device_get(self.last)
            arrays = {
                k: np.asarray(out[k])
                for k in ("y_global", "y_local", "y_fusion", "saliency_map", "patch_locations", "patch_attns")
            }
        else:
            (loss, _), grads = jax.device_get(self.last)
            arrays = {
                "loss": np.asarray(loss),
                **{f"grad/{k}": v for k, v in variables_to_state_dict({"params": grads}).items()},
            }
        np.savez(path, **arrays)
        return str(path)

    def _profile(self, logdir: Path) -> dict:
        with jax.profiler.trace(str(logdir), create_perfetto_trace=True):
            jax.block_until_ready(self.compiled(*self.args))
        return {"summary": profile_summary.summarize(logdir, self.compiled.as_text())}


class TorchRunner:
    def __init__(self, spec: dict):
        self.spec = spec
        with np.load(spec["weights"]) as f:
            state_dict = {k: f[k] for k in f.files}
        self.ref = tref.TorchGMIC(
            spec["torch_ref"],
            state_dict,
            image_shape=spec["image_shape"],
            crop_shape=spec["crop_shape"],
            K=spec["K"],
            percent_t=spec["percent_t"],
            cam_size=saliency_grid_shape(spec["image_shape"]),
            device=spec["device"],
            threads=spec["threads"],
            **tref.PEERS[spec["impl"]],
        )
        highest = spec.get("precision") == "highest"
        self.ref.torch.backends.cudnn.allow_tf32 = not highest  # PyTorch's default: True
        self.ref.torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default
        self.x = self.ref.to_input(np.load(spec["input"])[..., None])
        self.y = self.ref.torch.from_numpy(bc.targets(self.x.shape[0])).to(self.ref.device)
        self.loss = None

    def ready(self) -> dict:
        torch = self.ref.torch
        info = {
            "device_kind": torch.cuda.get_device_name(0) if self.ref.device.type == "cuda" else "cpu",
            "platform": self.ref.device.type,
            "params": self.ref.param_counts(),
            "compile_s": 0.0,
            "compile_cache": "off",
            "xla_temp_bytes": None,
            "torch_threads": torch.get_num_threads(),
            "flops_source": "torch.utils.flop_counter",
        }
        if tref.PEERS[self.spec["impl"]].get("compile"):  # the first call traces and compiles
            t0 = time.perf_counter()
            self.handle({"cmd": "run"})
            info["compile_s"] = time.perf_counter() - t0
        if self.spec["phase"] == "train":
            if self.ref.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                self.loss = self._step()
                info.update(peak_mem_bytes=int(torch.cuda.max_memory_allocated()), mem_method="max_memory_allocated")
            else:
                with bc.ResidentRise() as rise:
                    self.loss = self._step()
                info.update(
                    peak_mem_bytes=rise.rise,
                    mem_method=f"resident rise ({rise.method})",
                    rss_before_bytes=rise.baseline,
                )
            if info["compile_s"]:
                info["mem_method"] += ", the step after the compiling one"
        if self.spec["phase"] == "train":
            info["flops"] = self.ref.train_step_flops(self.x, self.y)
        else:
            info["flops"] = self.ref.forward_flops(self.x)
        return info

    def _step(self):
        loss = self.ref.train_step(self.x, self.y)
        self.ref.sync()
        return loss

    def handle(self, msg: dict) -> dict:
        if msg["cmd"] == "run":
            t0 = time.perf_counter()
            if self.spec["phase"] == "fwd":
                self.ref.forward(self.x)
                self.ref.sync()
            else:
                self.loss = self._step()
            return {"ms": (time.perf_counter() - t0) * 1e3}
        if msg["cmd"] == "save":
            path = Path(msg["path"])
            if self.spec["phase"] == "fwd":
                arrays = self.ref.outputs()
            else:
                arrays = {
                    "loss": np.asarray(float(self.loss.detach())),
                    **{f"grad/{k}": v for k, v in self.ref.grads().items()},
                }
            np.savez(path, **arrays)
            return {"path": str(path)}
        raise ValueError(f"unknown command {msg['cmd']!r}")


def run_worker(spec: dict) -> int:
    holder = {}

    def ready():
        if spec["impl"] == "jax":
            apply_cpu_defaults()  # the project's XLA:CPU defaults, unless the flags given say otherwise
            enable_compile_cache()  # as the CLI: GMIC_JAX_COMPILE_CACHE=DIR or off
        if spec.get("deviceless"):
            holder["runner"] = deviceless.DevicelessRunner(spec)
            return holder["runner"].ready()
        try:
            holder["runner"] = (JaxRunner if spec["impl"] == "jax" else TorchRunner)(spec)
            info = holder["runner"].ready()
        except Exception as e:
            if spec["impl"] in ("jax", "torch"):
                raise
            traceback.print_exc()  # a peer that cannot run here becomes a "skipped" row
            return {"skipped": f"{type(e).__name__}: {e}"[:400]}
        return {**info, "xla_flags": os.environ.get("XLA_FLAGS", "")}

    return bc.serve(lambda msg: holder["runner"].handle(msg), ready)
