"""One figure per image, as the original release draws them: what GMIC looked at and why.

Panels, left to right (4 + K of them, one row):

1. the input window, with the ground-truth lesions (benign green, malignant red) when known;
2. the patch map: the K retrieved patches (outlined and numbered 1..K) over the input;
3. the benign saliency map over the input (green, transparent where low);
4. the malignant saliency map over the input (red, transparent where low);
5. ... the K patches as the local network saw them, each titled with its attention weight alpha_k.

The figure has a fixed size in pixels (:func:`figure_size`), so a batch of figures lines up.
Rendered with matplotlib's object API (no pyplot state), so it works headless and in threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from gmic_jax.files import atomic_path

PANEL_PX = 300  # width of every panel
TITLE_PX = 40  # band above the panels for their titles
DPI = 100
SALIENCY_ALPHA_MAX = 0.95  # opacity of a saliency value of 1 (0 is fully transparent)


def figure_size(
    image_shape: Sequence[int], crop_shape: Sequence[int], K: int, panel_px: int = PANEL_PX
) -> tuple[int, int]:
    """(width, height) in pixels of the PNG that :func:`save_figure` writes."""
    H, W = image_shape
    ch, cw = crop_shape
    body = max(round(panel_px * H / W), round(panel_px * ch / cw))
    return panel_px * (4 + K), TITLE_PX + body


def _reduce(array: np.ndarray, factor: int, how: str = "mean") -> np.ndarray:
    """Block-reduce a 2-D array by ``factor`` (display only: matplotlib would resample anyway)."""
    if factor <= 1:
        return array
    h, w = (array.shape[0] // factor) * factor, (array.shape[1] // factor) * factor
    blocks = array[:h, :w].reshape(h // factor, factor, w // factor, factor)
    return blocks.max(axis=(1, 3)) if how == "max" else blocks.mean(axis=(1, 3))


def _alpha_cmap(name: str):
    """The named colormap with opacity rising linearly from 0 to SALIENCY_ALPHA_MAX."""
    colors = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))
    colors[:, -1] = np.linspace(0.0, SALIENCY_ALPHA_MAX, 256)
    return ListedColormap(colors, name=f"{name}_alpha")


def _overlay_masks(ax, masks, extent):
    """Ground truth: benign in green, malignant in red, each opaque only on the lesion."""
    if masks is None:
        return
    for c, color in ((0, (0.1, 0.75, 0.2, 0.6)), (1, (0.9, 0.15, 0.1, 0.6))):
        lesion = np.asarray(masks[..., c]) > 0
        if lesion.any():
            ax.imshow(
                np.ma.masked_where(~lesion, lesion.astype(np.float32)),
                cmap=ListedColormap([color]),
                vmin=0,
                vmax=1,
                extent=extent,
                interpolation="nearest",
            )


def save_figure(
    path,
    image: np.ndarray,
    saliency_map: np.ndarray,
    patch_locations: np.ndarray,
    patches: np.ndarray,
    patch_attns: np.ndarray,
    crop_shape: Sequence[int],
    masks: Optional[np.ndarray] = None,
    title: Optional[str] = None,
    panel_px: int = PANEL_PX,
) -> Path:
    """Write the figure of one image as PNG (atomically) and return its path.

    image: (H, W) the model's input window; saliency_map: (h, w, 2) [benign, malignant] as the
    model returns it; patch_locations: (K, 2) pixel upper-left (row, col); patches: (K, ch, cw);
    patch_attns: (K,); masks: optional (H, W, 2) ground truth in the window frame; title: shown
    above the input panel (e.g. the predictions).
    """
    image = np.asarray(image, np.float32)
    saliency_map = np.asarray(saliency_map, np.float32)
    patch_locations = np.asarray(patch_locations)
    patches = np.asarray(patches, np.float32)
    patch_attns = np.asarray(patch_attns, np.float32)
    num_patches = patch_locations.shape[0]
    crop_h, crop_w = crop_shape
    if saliency_map.ndim != 3 or saliency_map.shape[-1] != 2:
        raise ValueError(f"saliency_map must be (h, w, 2), got {saliency_map.shape}")
    if patches.shape != (num_patches, crop_h, crop_w) or patch_attns.shape != (num_patches,):
        raise ValueError(
            f"expected patches ({num_patches}, {crop_h}, {crop_w}) and patch_attns ({num_patches},), "
            f"got {patches.shape} and {patch_attns.shape}"
        )
    panels = _Panels(image, crop_shape, num_patches, panel_px, masks)

    ax = panels.window(0, title or "input image")
    panels.overlay_masks(ax)

    ax = panels.window(1, "patch map")
    panels.overlay_masks(ax)
    for k, (row, col) in enumerate(patch_locations):
        ax.add_patch(
            Rectangle(
                (col - 0.5, row - 0.5),
                crop_w,
                crop_h,
                fill=True,
                facecolor=(0.15, 0.45, 0.85, 0.25),
                edgecolor=(0.15, 0.45, 0.95, 1.0),
                linewidth=1.0,
            )
        )
        ax.text(col + 2, row + 2, str(k + 1), color="yellow", fontsize=7, va="top", ha="left")

    for i, (c, name, cmap) in enumerate(((0, "SM: benign", "Greens"), (1, "SM: malignant", "Reds"))):
        ax = panels.window(2 + i, name)
        ax.imshow(
            saliency_map[..., c],
            cmap=_alpha_cmap(cmap),
            vmin=0.0,
            vmax=1.0,
            extent=panels.extent,
            interpolation="bilinear",
        )

    for k in range(num_patches):
        ax = panels.add(4 + k, crop_h / crop_w)
        ax.imshow(patches[k], cmap="gray", interpolation="nearest")
        ax.set_title(f"$\\alpha_{{{k + 1}}}$ = {patch_attns[k]:.2f}", fontsize=9)
        ax.set_axis_off()

    path = Path(path)
    with atomic_path(path) as tmp:
        panels.fig.savefig(tmp, format="png", dpi=DPI)
    return path


class _Panels:
    """The figure of one image and its panels, one row under the title band; the window (and the
    ground-truth masks) as shown, at about twice a panel's resolution, in the full window's
    coordinates."""

    def __init__(self, image: np.ndarray, crop_shape, num_patches: int, panel_px: int, masks):
        height, width = image.shape
        self.panel_px, self.aspect_hw = panel_px, height / width
        self.width_px, self.height_px = figure_size((height, width), crop_shape, num_patches, panel_px)
        self.body_px = self.height_px - TITLE_PX
        self.fig = Figure(figsize=(self.width_px / DPI, self.height_px / DPI), dpi=DPI)
        self.fig.patch.set_facecolor("white")
        self.extent = (-0.5, width - 0.5, height - 0.5, -0.5)
        self.low, self.high = float(image.min()), float(image.max())
        factor = max(1, width // (2 * panel_px))
        self.shown = _reduce(image, factor)
        self.shown_extent = (-0.5, self.shown.shape[1] * factor - 0.5, self.shown.shape[0] * factor - 0.5, -0.5)
        self.masks = None
        if masks is not None:
            self.masks = np.stack([_reduce(np.asarray(masks[..., c]) > 0, factor, "max") for c in range(2)], axis=-1)

    def add(self, i: int, aspect_hw: float):
        """Axes of panel ``i`` (top-aligned under the title band)."""
        h_px = self.panel_px * aspect_hw
        return self.fig.add_axes(
            [
                i * self.panel_px / self.width_px,
                (self.body_px - h_px) / self.height_px,
                self.panel_px / self.width_px,
                h_px / self.height_px,
            ]
        )

    def window(self, i: int, name: str):
        """Panel ``i``: the window in gray, titled ``name``."""
        ax = self.add(i, self.aspect_hw)
        ax.imshow(
            self.shown,
            cmap="gray",
            vmin=self.low,
            vmax=self.high if self.high > self.low else self.low + 1,
            extent=self.shown_extent,
            interpolation="antialiased",
        )
        ax.set_xlim(self.extent[0], self.extent[1])
        ax.set_ylim(self.extent[2], self.extent[3])
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
        return ax

    def overlay_masks(self, ax) -> None:
        _overlay_masks(ax, self.masks, self.shown_extent)
