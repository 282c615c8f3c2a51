"""Run the original PyTorch GMIC from a checkout of its release, for side-by-side benchmarks.

Nothing of the original is copied here: its model is imported from the user's checkout
(`--torch-ref PATH`, the folder holding `src/modeling/gmic.py`) and run as it is, per-crop Python
loop included, since that is what users compare against. It needs torch and torchvision 0.2.2
(`pip install torch torchvision==0.2.2.post3`); that torchvision imports `PIL.PILLOW_VERSION`,
which Pillow >= 7 no longer has, so it is set to Pillow's version before the import.
"""

from __future__ import annotations

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


class TorchGMIC:
    """The original model with given weights, on CPU or one GPU; batches are NHWC numpy arrays."""

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

    def to_input(self, x_nhwc: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2)))).to(self.device)

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def forward(self, x):
        """Inference as the original runs it: eval mode, no gradient."""
        self.model.eval()
        with self.torch.no_grad():
            return self.model(x)

    def loss(self, y_fusion, target):
        bce = self.torch.nn.functional.binary_cross_entropy
        m = self.model
        return bce(m.y_global, target) + bce(m.y_local, target) + bce(y_fusion, target)

    def train_step(self, x, target):
        """Forward + backward in training mode (BatchNorm on batch statistics); returns the loss."""
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        loss = self.loss(self.model(x), target)
        loss.backward()
        return loss

    def outputs(self) -> dict[str, np.ndarray]:
        """The last forward's outputs, named and laid out as gmic-jax's (NHWC saliency maps)."""
        m = self.model

        def to_np(t):
            return t.detach().cpu().numpy()

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
        with counter:
            self.forward(x)
        return int(counter.get_total_flops())

    def train_step_flops(self, x, target) -> int:
        """FLOPs of `train_step` (forward + backward) by torch's flop counter."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.train_step(x, target)
        self.sync()
        return int(counter.get_total_flops())


__all__ = ["TorchGMIC", "TorchReferenceError", "load_original", "original_parameters"]
