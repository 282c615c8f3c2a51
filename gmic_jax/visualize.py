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

import numpy as np

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
    import matplotlib
    from matplotlib.colors import ListedColormap

    colors = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))
    colors[:, -1] = np.linspace(0.0, SALIENCY_ALPHA_MAX, 256)
    return ListedColormap(colors, name=f"{name}_alpha")


def _overlay_masks(ax, masks, extent):
    """Ground truth: benign in green, malignant in red, each opaque only on the lesion."""
    from matplotlib.colors import ListedColormap

    if masks is None:
        return
    for c, color in ((0, (0.1, 0.75, 0.2, 0.6)), (1, (0.9, 0.15, 0.1, 0.6))):
        m = np.asarray(masks[..., c]) > 0
        if m.any():
            ax.imshow(
                np.ma.masked_where(~m, m.astype(np.float32)),
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
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    image = np.asarray(image, np.float32)
    saliency_map = np.asarray(saliency_map, np.float32)
    patch_locations = np.asarray(patch_locations)
    patches = np.asarray(patches, np.float32)
    patch_attns = np.asarray(patch_attns, np.float32)
    H, W = image.shape
    K = patch_locations.shape[0]
    ch, cw = crop_shape
    if saliency_map.ndim != 3 or saliency_map.shape[-1] != 2:
        raise ValueError(f"saliency_map must be (h, w, 2), got {saliency_map.shape}")
    if patches.shape != (K, ch, cw) or patch_attns.shape != (K,):
        raise ValueError(
            f"expected patches ({K}, {ch}, {cw}) and patch_attns ({K},), got {patches.shape} and {patch_attns.shape}"
        )

    width_px, height_px = figure_size((H, W), crop_shape, K, panel_px)
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    fig.patch.set_facecolor("white")
    body_px = height_px - TITLE_PX

    def panel(i, aspect_hw):
        h_px = panel_px * aspect_hw
        # Panels are top-aligned under the title band.
        return fig.add_axes(
            [i * panel_px / width_px, (body_px - h_px) / height_px, panel_px / width_px, h_px / height_px]
        )

    extent = (-0.5, W - 0.5, H - 0.5, -0.5)
    lo, hi = float(image.min()), float(image.max())
    # Shown at about twice the panel's resolution; coordinates stay those of the full window.
    factor = max(1, W // (2 * panel_px))
    shown = _reduce(image, factor)
    shown_extent = (-0.5, shown.shape[1] * factor - 0.5, shown.shape[0] * factor - 0.5, -0.5)
    if masks is not None:
        masks = np.stack([_reduce(np.asarray(masks[..., c]) > 0, factor, "max") for c in range(2)], axis=-1)

    def base(i, name):
        ax = panel(i, H / W)
        ax.imshow(
            shown,
            cmap="gray",
            vmin=lo,
            vmax=hi if hi > lo else lo + 1,
            extent=shown_extent,
            interpolation="antialiased",
        )
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
        return ax

    ax = base(0, title or "input image")
    _overlay_masks(ax, masks, shown_extent)

    ax = base(1, "patch map")
    _overlay_masks(ax, masks, shown_extent)
    for k, (r, c) in enumerate(patch_locations):
        ax.add_patch(
            Rectangle(
                (c - 0.5, r - 0.5),
                cw,
                ch,
                fill=True,
                facecolor=(0.15, 0.45, 0.85, 0.25),
                edgecolor=(0.15, 0.45, 0.95, 1.0),
                linewidth=1.0,
            )
        )
        ax.text(c + 2, r + 2, str(k + 1), color="yellow", fontsize=7, va="top", ha="left")

    for i, (c, name, cmap) in enumerate(((0, "SM: benign", "Greens"), (1, "SM: malignant", "Reds"))):
        ax = base(2 + i, name)
        ax.imshow(
            saliency_map[..., c], cmap=_alpha_cmap(cmap), vmin=0.0, vmax=1.0, extent=extent, interpolation="bilinear"
        )

    for k in range(K):
        ax = panel(4 + k, ch / cw)
        ax.imshow(patches[k], cmap="gray", interpolation="nearest")
        ax.set_title(f"$\\alpha_{{{k + 1}}}$ = {patch_attns[k]:.2f}", fontsize=9)
        ax.set_axis_off()

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path
