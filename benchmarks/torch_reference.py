"""Run the original PyTorch GMIC from a checkout of its release, for side-by-side benchmarks.

Nothing of the original is copied here: its model is imported from the user's checkout
(`--torch-ref PATH`, the folder holding `src/modeling/gmic.py`) and run as it is, per-crop Python
loop included, since that is what users compare against. It needs torch and torchvision 0.2.2
(`pip install torch torchvision==0.2.2.post3`); that torchvision imports `PIL.PILLOW_VERSION`,
which Pillow >= 7 no longer has, so it is set to Pillow's version before the import.

Besides the original as released (eager, float32, NCHW: the row "torch"), `PEERS` names the
PyTorch configurations a performance-minded user would run, each a set of `TorchGMIC` options:
* `autocast_bf16`: `torch.autocast(device, torch.bfloat16)` around the forward pass and the loss
  (the loss's BCE runs in float32 inside that region: autocast's own CPU policy, and on CUDA
  autocast refuses `binary_cross_entropy`);
* `channels_last`: model and input in `torch.channels_last` memory format (NHWC strides);
* `compile`: `torch.compile` (default mode). "networks" (or True) compiles the three
  convolutional networks, the global network's ResNet-22 (`ds_net`) and saliency head
  (`left_postprocess_net`) and the local network's ResNet-18 (`dn_resnet`): where the time is,
  and what the issue's own measurement compiled. Their `forward` is replaced on the instance, so
  the module tree, the parameter names and the direct `.forward()` calls of the original's
  wrappers stay as they are. "model" is `torch.compile(model)`, what a user writes: dynamo breaks
  the graph at the patch selection (numpy, `.cpu()`, the per-crop copy loop; at 256 x 192 in
  eval mode 14 graphs, 8 breaks) and, tried on four inputs there, compiled once, not again when
  the chosen patches changed.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from bench_common import param_counts


class TorchReferenceError(RuntimeError):
    pass


def load_original(path):
    """The original's `gmic` model module from a checkout at `path`."""
    path = Path(path).resolve()
    if not (path / "src" / "modeling" / "gmic.py").is_file():
        raise TorchReferenceError(
            f"--torch-ref {path}: no src/modeling/gmic.py there; expected a checkout of the original GMIC release"
        )
    try:
        import torch  # noqa: F401
    except ImportError:
        raise TorchReferenceError("--torch-ref needs torch: pip install torch torchvision==0.2.2.post3") from None
    import PIL

    if not hasattr(PIL, "PILLOW_VERSION"):
        PIL.PILLOW_VERSION = PIL.__version__
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    try:
        from src.modeling import gmic
    except ImportError as e:
        raise TorchReferenceError(
            f"--torch-ref {path}: cannot import its model ({e}); it needs "
            "torchvision 0.2.2 (pip install torchvision==0.2.2.post3)"
        ) from None
    return gmic


def original_parameters(
    image_shape: Sequence[int],
    crop_shape: Sequence[int],
    K: int,
    percent_t: float,
    cam_size: Sequence[int],
    device: str,
) -> dict:
    """The original's inference parameters (its run script's dictionary, model 1) for these shapes."""
    return {
        "device_type": "gpu" if device == "gpu" else "cpu",
        "gpu_number": 0,
        "max_crop_noise": (100, 100),
        "max_crop_size_noise": 100,
        "cam_size": tuple(cam_size),
        "K": int(K),
        "crop_shape": tuple(crop_shape),
        "post_processing_dim": 256,
        "num_classes": 2,
        "use_v1_global": False,
        "percent_t": float(percent_t),
    }


# impl name (a "results" row of the benchmarks) -> TorchGMIC options; "torch" is the original as released.
PEERS = {
    "torch": {},
    "torch_bf16": {"autocast_bf16": True},
    "torch_channels_last": {"channels_last": True},
    "torch_compile": {"compile": True},
    "torch_compile_channels_last": {"compile": True, "channels_last": True},
    "torch_bf16_channels_last": {"autocast_bf16": True, "channels_last": True},
    "torch_compile_bf16_channels_last": {"compile": True, "autocast_bf16": True, "channels_last": True},
    "torch_compile_model_channels_last": {"compile": "model", "channels_last": True},
}
# The original's modules that `compile` compiles (attributes of its GMIC module).
COMPILED_NETWORKS = ("ds_net", "left_postprocess_net", "dn_resnet")


def peer_dtype(name: str) -> str:
    """The compute dtype of a peer: bfloat16 under autocast, else float32."""
    return "bfloat16" if PEERS[name].get("autocast_bf16") else "float32"


def peer_unavailable(name: str, device: str) -> str | None:
    """Why peer `name` cannot run on `device` ('cpu' | 'gpu') here, or None. Checked before its worker
    starts; failures only seen when it runs are reported by the worker in the same way."""
    import torch

    opts = PEERS[name]
    if opts.get("compile"):
        if not hasattr(torch, "compile"):
            return f"torch {torch.__version__} has no torch.compile"
        if device == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            return "torch.compile on CPU (inductor) needs a C++ compiler; none on PATH"
    if opts.get("autocast_bf16") and device == "gpu" and not torch.cuda.is_bf16_supported():
        return "this GPU does not support bfloat16"
    return None


def raise_recompile_limit(torch, limit: int = 64) -> None:
    """Dynamo keeps compiled code per code object, and every `torch.compile(bound_method)` runs
    through one shared wrapper's code, whose entries (one per compiled method and mode) count
    against a recompile limit of 8, past which the methods run eagerly; several compiled methods
    need more."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, the older one
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))


class TorchGMIC:
    """The original model with given weights, on CPU or one GPU; batches are NHWC numpy arrays.
    `autocast_bf16`, `channels_last` and `compile` make it one of the `PEERS` (module docstring)."""

    def __init__(
        self,
        path,
        state_dict: Mapping[str, np.ndarray],
        *,
        image_shape,
        crop_shape,
        K: int,
        percent_t: float,
        cam_size,
        device: str = "cpu",
        threads: int | None = None,
        autocast_bf16: bool = False,
        channels_last: bool = False,
        compile: bool | str = False,
    ):
        import torch

        if threads:
            torch.set_num_threads(int(threads))
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:  # already set in this process
                pass
        gmic = load_original(path)
        self.torch = torch
        self.device = torch.device("cuda:0" if device == "gpu" else "cpu")
        self.model = gmic.GMIC(original_parameters(image_shape, crop_shape, K, percent_t, cam_size, device))
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
        self.model.load_state_dict(tensors, strict=True)
        self.model.to(self.device)
        self.autocast_bf16, self.channels_last = autocast_bf16, channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._compiled = {}
        self._run = self._whole = self.model  # what forward and train_step call
        if compile == "model":
            self._run = self._whole = torch.compile(self.model)
        elif compile:
            raise_recompile_limit(torch)
            for name in COMPILED_NETWORKS:
                net = getattr(self.model, name)
                net.forward = self._compiled[name] = torch.compile(net.forward)

    def to_input(self, x_nhwc: np.ndarray):
        x = self.torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2)))).to(self.device)
        return x.contiguous(memory_format=self.torch.channels_last) if self.channels_last else x

    def _autocast(self):
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)

    @contextlib.contextmanager
    def eager(self):
        """Within it the model runs eagerly, compiled networks too (for the FLOP counter, which
        counts the operations that eager mode dispatches)."""
        for name in self._compiled:
            del getattr(self.model, name).forward  # the class's forward shows through again
        self._run = self.model
        try:
            yield
        finally:
            self._run = self._whole
            for name, fn in self._compiled.items():
                getattr(self.model, name).forward = fn

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def forward(self, x):
        """Inference as the original runs it: eval mode, no gradient."""
        self.model.eval()
        with self.torch.no_grad(), self._autocast():
            return self._run(x)

    def loss(self, y_fusion, target):
        """The three heads' BCE, in float32 (under autocast too: see the module docstring)."""
        bce = self.torch.nn.functional.binary_cross_entropy
        m = self.model
        with self.torch.autocast(self.device.type, enabled=False):
            return sum(bce(y.float(), target) for y in (m.y_global, m.y_local, y_fusion))

    def train_step(self, x, target):
        """Forward + backward in training mode (BatchNorm on batch statistics); returns the loss."""
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss(self._run(x), target)
        loss.backward()
        return loss

    def outputs(self) -> dict[str, np.ndarray]:
        """The last forward's outputs, named and laid out as gmic-jax's (NHWC saliency maps)."""
        m = self.model

        def to_np(t):  # float32: numpy has no bfloat16
            return t.detach().float().cpu().numpy()

        return {
            "y_global": to_np(m.y_global),
            "y_local": to_np(m.y_local),
            "y_fusion": to_np(m.y_fusion),
            "saliency_map": np.transpose(to_np(m.saliency_map), (0, 2, 3, 1)),
            "patch_locations": np.asarray(m.patch_locations).astype(np.int64),
            "patch_attns": to_np(m.patch_attns),
        }

    def grads(self) -> dict[str, np.ndarray]:
        return {k: p.grad.detach().cpu().numpy() for k, p in self.model.named_parameters() if p.grad is not None}

    def param_counts(self) -> dict[str, int]:
        return param_counts({k: p.numel() for k, p in self.model.named_parameters()})

    def forward_flops(self, x) -> int:
        """FLOPs of `forward` by torch's flop counter (2 per multiply-add; every tap of a padded
        convolution counts)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with self.eager(), counter:
            self.forward(x)
        return int(counter.get_total_flops())

    def train_step_flops(self, x, target) -> int:
        """FLOPs of `train_step` (forward + backward) by torch's flop counter."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with self.eager(), counter:
            self.train_step(x, target)
        self.sync()
        return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- result rows
def _label(row: dict) -> str:
    return f"{row['impl']} {row['dtype']}" + ("" if row.get("remat", "none") == "none" else f" remat={row['remat']}")


def fastest_peer(results: list[dict], dtype: str, key: str) -> dict | None:
    """The PyTorch row ("torch", "torch_*") of `dtype` with the smallest `key` (e.g. "fwd_bwd_ms",
    "fwd_ms") among those that ran, or None."""
    rows = [
        r
        for r in results
        if r["impl"].startswith("torch") and r["dtype"] == dtype and not r.get("skipped") and r.get(key) is not None
    ]
    return min(rows, key=lambda r: r[key], default=None)


def like_with_like(results: list[dict]) -> list[str]:
    """Per JAX row and phase: its time against the fastest PyTorch row of its dtype and against the
    original ("torch" float32), each naming both rows."""

    def versus(what, r, other, key):
        return f"{what}, {_label(other)} ({other[key]:.0f} ms): {r[key] / other[key]:.2f}x"

    lines = []
    original = next((r for r in results if r["impl"] == "torch" and not r.get("skipped")), None)
    for r in results:
        if r["impl"] != "jax" or r.get("skipped"):
            continue
        for key, phase in (("fwd_bwd_ms", "forward + backward"), ("fwd_ms", "forward")):
            peer = fastest_peer(results, r["dtype"], key)
            vs = [versus(f"the fastest PyTorch {r['dtype']}", r, peer, key)] if peer else []
            if original is not None and original is not peer:
                vs.append(versus("the original", r, original, key))
            if vs:
                lines.append(f"{phase}, {_label(r)} ({r[key]:.0f} ms) against " + "; against ".join(vs))
    return lines


__all__ = [
    "COMPILED_NETWORKS",
    "PEERS",
    "TorchGMIC",
    "TorchReferenceError",
    "fastest_peer",
    "like_with_like",
    "load_original",
    "original_parameters",
    "peer_dtype",
    "peer_unavailable",
    "raise_recompile_limit",
]
