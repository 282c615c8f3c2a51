"""The per-image figure: fixed pixel size, the panels it promises, bad shapes refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gmic_jax.visualize import PANEL_PX, TITLE_PX, figure_size, save_figure


def _inputs(H=256, W=192, K=3, crop=(48, 48), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((H, W)).astype(np.float32)
    saliency = np.zeros((4, 3, 2), np.float32)
    saliency[1, 2, 1] = 1.0  # one hot cell of the malignant map
    locations = np.array([[0, 0], [H - crop[0], W - crop[1]], [10, 20]])[:K]
    patches = rng.standard_normal((K, *crop)).astype(np.float32)
    attns = np.array([0.5, 0.3, 0.2])[:K]
    return image, saliency, locations, patches, attns


def test_figure_size():
    assert figure_size((2944, 1920), (256, 256), 6) == (10 * PANEL_PX, TITLE_PX + round(PANEL_PX * 2944 / 1920))
    assert figure_size((2944, 1920), (256, 256), 6) == (3000, 500)
    # A crop taller than the image's aspect sets the height.
    assert figure_size((100, 200), (64, 32), 2) == (6 * PANEL_PX, TITLE_PX + 2 * PANEL_PX)


@pytest.mark.parametrize("with_masks", [False, True])
def test_save_figure_writes_png_of_the_promised_size(tmp_path, with_masks):
    image, saliency, locations, patches, attns = _inputs()
    masks = None
    if with_masks:
        masks = np.zeros((256, 192, 2), np.uint8)
        masks[100:140, 50:90, 0] = 1
    path = save_figure(
        tmp_path / "sub" / "a.png",
        image,
        saliency,
        locations,
        patches,
        attns,
        (48, 48),
        masks=masks,
        title="L-CC: benign 0.10, malignant 0.90",
    )
    assert path.exists() and not list((tmp_path / "sub").glob(".*tmp*"))
    png = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert png.shape[:2][::-1] == figure_size((256, 192), (48, 48), 3) == (2100, 440)

    # Panel 4 (malignant saliency) is red where the hot cell is and grey elsewhere; panel 3
    # (benign, all zero) shows the image unchanged (grey: r == g == b).
    body = png[TITLE_PX:]
    benign = body[:, 2 * PANEL_PX : 3 * PANEL_PX]
    malignant = body[:, 3 * PANEL_PX : 4 * PANEL_PX]
    cell_h, cell_w = 400 // 4, PANEL_PX // 3
    hot = malignant[cell_h + 20 : 2 * cell_h - 20, 2 * cell_w + 20 : 3 * cell_w - 20]
    cold = malignant[20 : cell_h - 20, 20 : cell_w - 20]
    assert (hot[..., 0] - hot[..., 1]).mean() > 100
    assert np.abs(cold[..., 0] - cold[..., 1]).mean() < 5
    assert np.abs(benign[..., 0] - benign[..., 1]).max() < 3
    # Ground truth is drawn in green on the input panel only when given.
    inp = body[:, :PANEL_PX]
    lesion = inp[
        int(100 / 256 * 400) + 5 : int(140 / 256 * 400) - 5, int(50 / 192 * PANEL_PX) + 5 : int(90 / 192 * PANEL_PX) - 5
    ]
    greenish = (lesion[..., 1] - lesion[..., 0]).mean()
    assert (greenish > 50) == with_masks


def test_save_figure_refuses_mismatched_shapes(tmp_path):
    image, saliency, locations, patches, attns = _inputs()
    with pytest.raises(ValueError, match="saliency_map must be"):
        save_figure(tmp_path / "a.png", image, saliency[..., 0], locations, patches, attns, (48, 48))
    with pytest.raises(ValueError, match="expected patches"):
        save_figure(tmp_path / "a.png", image, saliency, locations, patches[:2], attns, (48, 48))
    assert not (tmp_path / "a.png").exists()
