"""The original's window noise: the draw rule (gmic_jax.data.window), caches that keep each image's
noise context (`gmic-jax cache --window-noise`), the crop + resize on the device against the host's
PIL (gmic_jax.resample) and training on fresh draws (data.window_noise)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gmic_jax.data import batch as batch_lib
from gmic_jax.data import window as W
from gmic_jax.data.batch import VIEWS
from gmic_jax.data.cache import CacheSource, build_cache
from gmic_jax.data.exam_list import PREPROCESSING_KEYS, load_exam_list, save_exam_list
from gmic_jax.data.image import DataError, read_image, write_png
from gmic_jax.data.sources import ExamListSource

WINDOW = (128, 64)  # the smallest window the model takes (a multiple of its 64-pixel saliency cell)
NOISE = ((6, 5), 4)  # (crop noise (y, x), size noise) for the small windows here


def _to_uint16(window):
    return np.clip(np.rint(window), 0, 65535).astype(np.uint16)


def _padded_reference(image, view, center, window_shape, crop_noise, size_noise, rng):
    """A draw on the WHOLE padded image (no context cut)."""
    margin = (crop_noise[0] + size_noise, crop_noise[1] + size_noise)
    (pad_top, pad_bottom, pad_right), at = W.window_bounds(image.shape, view, center, window_shape, margin)
    padded = np.zeros((image.shape[0] + pad_top + pad_bottom, image.shape[1] + pad_right), np.float32)
    padded[pad_top : pad_top + image.shape[0], : image.shape[1]] = image
    borders = W.noise_borders(padded.shape, at, window_shape, rng, crop_noise, size_noise)
    return W.crop_resized(padded, borders, window_shape)


def _write_exam_list(root, shapes, seed=0, masks=True):
    """Cropped (stored, unflipped) 16-bit images + a preprocessed exam list + window-frame masks.

    ``shapes``: per exam, the image shape of each view (CC shorter than the window, MLO taller...)."""
    rng = np.random.default_rng(seed)
    images, segs = root / "images", root / "seg"
    exams = []
    for e, shape in enumerate(shapes):
        exam = {
            "horizontal_flip": "NO",
            "best_center": {},
            "cancer_label": {
                "left_benign": e % 2,
                "left_malignant": 0,
                "right_benign": 0,
                "right_malignant": 1,
                "benign": e % 2,
                "malignant": 1,
                "unknown": 0,
            },
        }
        for key in PREPROCESSING_KEYS[:-1]:
            exam[key] = {view: [0] for view in VIEWS}
        for k, view in enumerate(VIEWS):
            h, w = shape[k]
            name = f"{e}_{view}"
            write_png(images / f"{name}.png", rng.integers(0, 4096, (h, w)).astype(np.uint16))
            exam[view] = [name]
            exam["best_center"][view] = [(int(rng.integers(0, h)), int(rng.integers(-10, w)))]
            exam[f"{view}_benign_seg"] = [f"{name}_benign"]
            exam[f"{view}_malignant_seg"] = [f"{name}_malignant"]  # absent file: no lesion
            if masks and k % 2 == 0:
                m = np.zeros(WINDOW, np.uint8)
                m[10 + k : 30 + k, 5:25] = 1
                write_png(segs / f"{name}_benign.png", m)
        exams.append(exam)
    save_exam_list(root / "exams.pkl", exams)
    return root / "exams.pkl", images, segs


SHAPES = [
    [(100, 50), (160, 110), (200, 40), (120, 90)],  # L-CC short, R-CC tall, L-MLO narrow, R-MLO wide
    [(128, 64), (240, 130), (40, 30), (150, 70)],
]


@pytest.fixture(scope="module")
def exam_list(tmp_path_factory):
    root = tmp_path_factory.mktemp("exams")
    return _write_exam_list(root, SHAPES)


@pytest.fixture(scope="module")
def caches(exam_list, tmp_path_factory):
    """The same exam list cached without and with window-noise contexts."""
    exams, images, segs = exam_list
    source = ExamListSource(exams, images, segs, window_shape=WINDOW)
    root = tmp_path_factory.mktemp("caches")
    assert build_cache(source, root / "plain", shard_size=3) == (8, [])
    assert build_cache(source, root / "noise", shard_size=3, num_workers=2, window_noise=NOISE) == (8, [])
    return source, CacheSource(root / "plain"), CacheSource(root / "noise")


def _flipped_image(source, i):
    item = source.items[i]
    pixels = read_image(f"{source.images_dir}/{item.name}.png").pixels
    return W.flip_for_model(pixels, item.view, item.horizontal_flip), item


# ----------------------------------------------------------------------------------- the draw rule


def test_noisy_window_without_noise_is_the_plain_window():
    rng = np.random.default_rng(0)
    for view, shape in (("L-CC", (180, 150)), ("R-MLO", (180, 150)), ("L-CC", (400, 260)), ("L-MLO", (400, 100))):
        image = rng.integers(0, 4096, shape).astype(np.float32)
        center = (shape[0] // 2 + 7, shape[1] - 60)
        got = W.noisy_window(image, view, center, (256, 192), np.random.default_rng(1), (0, 0), 0)
        np.testing.assert_array_equal(got, W.place_window(image, view, center, (256, 192), dtype=np.float32))


def test_noisy_window_moves_the_window_within_its_amplitude():
    image = np.random.default_rng(0).integers(0, 4096, (600, 500)).astype(np.float32)
    center = (300, 250)
    plain = W.place_window(image, "L-CC", center, (256, 192))
    seen = set()
    for seed in range(20):
        got = W.noisy_window(image, "L-CC", center, (256, 192), np.random.default_rng(seed), (10, 12), 0)
        # Crop noise only: the window is the image shifted by (dy, dx) within the amplitude.
        matches = [
            (dy, dx)
            for dy in range(-10, 11)
            for dx in range(-12, 13)
            if np.array_equal(got, image[172 + dy : 428 + dy, 154 + dx : 346 + dx])
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 10  # it does move
    got = W.noisy_window(image, "L-CC", center, (256, 192), np.random.default_rng(0), (10, 12), 8)
    assert got.shape == (256, 192) and got.dtype == np.float32 and not np.array_equal(got, plain)
    # Seeded: the same generator state gives the same draw.
    again = W.noisy_window(image, "L-CC", center, (256, 192), np.random.default_rng(0), (10, 12), 8)
    np.testing.assert_array_equal(got, again)
    assert W.window_noise_amplitudes((2944, 1920)) == ((100, 100), 100)
    assert W.window_noise_amplitudes((736, 480)) == ((25, 25), 25)


def test_a_draw_from_the_context_equals_the_draw_on_the_whole_padded_image():
    rng = np.random.default_rng(0)
    wh, ww = WINDOW
    for case in range(300):
        view = ("L-CC", "R-MLO", "R-CC", "L-MLO")[case % 4]
        h, w = int(rng.integers(5, 150)), int(rng.integers(5, 120))
        image = rng.integers(0, 4096, (h, w)).astype(np.uint16)
        center = (int(rng.integers(-20, h + 20)), int(rng.integers(-20, w + 20)))
        crop_noise = (int(rng.integers(0, 9)), int(rng.integers(0, 9))) if case % 7 else (0, 0)
        size_noise = int(rng.integers(0, 7))
        seed = int(rng.integers(1 << 31))
        context, at, origin = W.noise_context(image, view, center, WINDOW, crop_noise, size_noise)
        my, mx = crop_noise[0] + size_noise, crop_noise[1] + size_noise
        assert context.dtype == np.uint16 and context.shape[0] <= wh + 2 * my and context.shape[1] <= ww + 2 * mx
        got = W.draw_window(context, at, WINDOW, np.random.default_rng(seed), crop_noise, size_noise)
        ref = _padded_reference(image, view, center, WINDOW, crop_noise, size_noise, np.random.default_rng(seed))
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(
            got, W.noisy_window(image, view, center, WINDOW, np.random.default_rng(seed), crop_noise, size_noise)
        )
        # origin: where the context sits in the image
        r, c = origin
        inside = context[max(-r, 0) : h - r, max(-c, 0) : w - c]
        np.testing.assert_array_equal(
            inside, image[max(r, 0) : max(r, 0) + inside.shape[0], max(c, 0) : max(c, 0) + inside.shape[1]]
        )


def test_noise_amplitudes_are_respected():
    rng = np.random.default_rng(1)
    (ny, nx), s = (10, 7), 6
    moves, sizes = [], []
    for _ in range(400):
        b = W.noise_borders((400, 250), (100, 90), WINDOW, rng, (ny, nx), s)
        moves.append(b - np.array([100, 100 + WINDOW[0], 90, 90 + WINDOW[1]]))
        sizes.append((b[1] - b[0], b[3] - b[2]))
    moves, sizes = np.array(moves), np.array(sizes)
    sh = round(s * WINDOW[1] / WINDOW[0])  # the shorter side's size noise
    assert np.abs(moves[:, :2]).max() <= ny + s and np.abs(moves[:, 2:]).max() <= nx + sh
    assert np.abs(moves[:, :2]).max() >= ny + s - 1 and np.abs(moves[:, 2:]).max() >= nx + sh - 1  # all of it
    assert np.abs(sizes[:, 0] - WINDOW[0]).max() <= 2 * s and np.abs(sizes[:, 1] - WINDOW[1]).max() <= 2 * sh
    assert len({tuple(m) for m in moves}) > 300
    # No room: a window filling the image cannot move or grow.
    b = W.noise_borders(WINDOW, (0, 0), WINDOW, rng, (ny, nx), s)
    assert list(b) == [0, WINDOW[0], 0, WINDOW[1]]


def test_masks_move_with_the_image():
    """Crop noise alone: image and masks are the same shifted cut; with size noise: nearest resize
    keeps the masks on the image's blocks."""
    image = np.zeros((250, 150), np.uint16)
    image[80:140, 50:80] = 1000  # a bright block ...
    masks = np.zeros((250, 150, 2), np.uint8)
    masks[80:140, 50:80, 1] = 1  # ... is the malignant lesion
    center = (110, 60)  # plain window: rows 46-174, columns 28-92
    plain_masks = W.place_window(masks, "L-CC", center, WINDOW)
    for size_noise in (0, 6):
        context, at, origin = W.noise_context(image, "L-CC", center, WINDOW, (8, 8), size_noise)
        mask_context = W.window_to_context(plain_masks, image.shape, "L-CC", center, context.shape, origin, WINDOW)
        for seed in range(10):
            window, drawn = W.draw_window(
                context, at, WINDOW, np.random.default_rng(seed), (8, 8), size_noise, masks=mask_context
            )
            assert drawn.dtype == np.uint8 and drawn.shape == WINDOW + (2,) and not drawn[..., 0].any()
            lesion = drawn[..., 1] == 1
            if size_noise == 0:  # crop noise alone: the same shifted cut
                np.testing.assert_array_equal(lesion, window == 1000)
            else:  # resized: the lesion stays on the bright block
                assert set(np.unique(drawn)) <= {0, 1} and 0.6 * 1800 < lesion.sum() < 1.6 * 1800
                assert np.abs(window[lesion] - 1000).mean() < 50 and np.abs(window[~lesion]).mean() < 50
                # nearest neighbour, pixel centres aligned: output pixel i takes input (i + 0.5) * in / out
                b = W.noise_borders(context.shape, at, WINDOW, np.random.default_rng(seed), (8, 8), size_noise)
                rows = b[0] + ((np.arange(WINDOW[0]) + 0.5) * (b[1] - b[0]) / WINDOW[0]).astype(int)
                cols = b[2] + ((np.arange(WINDOW[1]) + 0.5) * (b[3] - b[2]) / WINDOW[1]).astype(int)
                np.testing.assert_array_equal(drawn, mask_context[rows[:, None], cols[None, :]])


# ----------------------------------------------------------------------------------------- caches


def test_plain_windows_of_a_context_cache_are_the_old_cache_windows(caches):
    source, plain, noise = caches
    assert not plain.has_contexts and plain.window_noise is None
    assert noise.has_contexts and noise.window_noise["crop_noise"] == [6, 5] and noise.window_noise["size_noise"] == 4
    for i in range(len(source)):
        a, b, c = source[i], plain[i], noise[i]
        assert a.keys() == b.keys() == c.keys() and batch_lib.MASK in a
        for key in a:
            np.testing.assert_array_equal(b[key], a[key])
            np.testing.assert_array_equal(c[key], a[key])
            assert b[key].dtype == c[key].dtype == a[key].dtype
    index = json.loads((noise.cache_dir / "index.json").read_text())
    assert index["window_noise"]["context_shape"] == [WINDOW[0] + 20, WINDOW[1] + 18]
    assert [s["contexts"] for s in index["shards"]] == [
        "contexts-00000.npy",
        "contexts-00001.npy",
        "contexts-00002.npy",
    ]
    stored = np.load(noise.cache_dir / "contexts-00000.npy", mmap_mode="r")
    assert stored.shape == (3, WINDOW[0] + 20, WINDOW[1] + 18) and stored.dtype == np.uint16
    # Contexts of different sizes: zero beyond each one's valid shape.
    shapes = {tuple(e["context"]["shape"]) for e in index["examples"]}
    assert len(shapes) > 2
    h, w = index["examples"][0]["context"]["shape"]
    assert not stored[0, h:].any() and not stored[0, :, w:].any()


def test_a_cached_draw_equals_noisy_window_on_the_image(caches):
    source, _, noise = caches
    for i in range(len(source)):
        image, item = _flipped_image(source, i)
        for seed in (0, 1):
            drawn = noise.draw(i, np.random.default_rng(seed))
            expected = W.noisy_window(image, item.view, item.best_center, WINDOW, np.random.default_rng(seed), *NOISE)
            np.testing.assert_array_equal(drawn["image"][..., 0], _to_uint16(expected))
            assert drawn["image"].dtype == np.uint16 and drawn["mask"].shape == WINDOW + (2,)
            for key in ("label", "image_id", "breast_id", "view"):
                np.testing.assert_array_equal(drawn[key], source[i][key])
        # The masks move with the image: the window-frame mask put into the whole noise-padded
        # image and cut at the borders of the same draw (nearest neighbour).
        view, center = item.view, item.best_center
        margin = (NOISE[0][0] + NOISE[1], NOISE[0][1] + NOISE[1])
        (pad_top, pad_bottom, pad_right), at = W.window_bounds(image.shape, view, center, WINDOW, margin)
        (plain_pad_top, _, _), (top, left) = W.window_bounds(image.shape, view, center, WINDOW)
        full = np.zeros((image.shape[0] + pad_top + pad_bottom, image.shape[1] + pad_right, 2), np.uint8)
        W.paste(full, source[i]["mask"], top - plain_pad_top + pad_top, left)
        borders = W.noise_borders(full.shape, at, WINDOW, np.random.default_rng(3), *NOISE)
        drawn = noise.draw(i, np.random.default_rng(3))
        np.testing.assert_array_equal(drawn["mask"], W.crop_resized(full, borders, WINDOW, nearest=True))
        assert drawn["mask"].any() == source[i]["mask"].any()


def test_noisy_examples_are_seeded_by_seed_epoch_and_index(caches):
    _, _, noise = caches
    a = noise.noisy_example(2, epoch=0, seed=0)
    np.testing.assert_array_equal(a["image"], noise.noisy_example(2, epoch=0, seed=0)["image"])
    again = CacheSource(noise.cache_dir).noisy_example(2, epoch=0, seed=0)  # a fresh reader (a resumed run)
    np.testing.assert_array_equal(a["image"], again["image"])
    np.testing.assert_array_equal(a["mask"], again["mask"])
    images = {(e, s): noise.noisy_example(2, epoch=e, seed=s)["image"].tobytes() for e in range(4) for s in (0, 1)}
    assert len(set(images.values())) == 8  # every epoch and seed its own draw
    assert not np.array_equal(a["image"], noise[2]["image"])
    assert "mask" not in noise.noisy_example(2, 0, 0, with_masks=False)


def test_window_noise_without_contexts_is_a_clear_error(caches, tmp_path):
    from gmic_jax.train.defaults import default_config
    from gmic_jax.train.sampling import make_sources

    _, plain, noise = caches
    with pytest.raises(DataError, match="--window-noise"):
        plain.draw(0, np.random.default_rng(0))
    c = default_config()
    c.data.source, c.data.window_noise = "cache", True
    c.data.train_cache, c.data.val_cache = str(plain.cache_dir), str(plain.cache_dir)
    with pytest.raises(DataError) as err:
        make_sources(c.data)
    assert str(plain.cache_dir) in str(err.value) and "gmic-jax cache" in str(err.value)
    assert "--window-noise" in str(err.value)
    c.data.train_cache = str(noise.cache_dir)
    train, val, _ = make_sources(c.data)
    assert train.has_contexts and not val.has_contexts
    c.data.source = "synthetic"
    with pytest.raises(ValueError, match="data.window_noise=True needs data.source='cache'"):
        make_sources(c.data)
    # Only exam lists have a best centre to draw around.
    with pytest.raises(ValueError, match="exam-list"):
        build_cache(plain, tmp_path / "c", window_noise=True)


def test_cache_cli_window_noise(exam_list, tmp_path, capsys):
    from gmic_jax.cli import main

    exams, images, segs = exam_list
    common = [
        "cache",
        "--source",
        "exam-list",
        "--exam-list",
        str(exams),
        "--images",
        str(images),
        "--window-shape",
        *map(str, WINDOW),
        "--no-progress",
        "--num-workers",
        "1",
    ]
    assert main(common + ["--output", str(tmp_path / "a"), "--window-noise"]) == 0
    cached = CacheSource(tmp_path / "a")
    assert cached.window_noise["crop_noise"] == [4, 3] and cached.window_noise["size_noise"] == 4  # 100 px, scaled
    assert (
        main(
            common + ["--output", str(tmp_path / "b"), "--window-noise", "--crop-noise", "3", "4", "--size-noise", "0"]
        )
        == 0
    )
    assert CacheSource(tmp_path / "b").window_noise == {
        "crop_noise": [3, 4],
        "size_noise": 0,
        "context_shape": [WINDOW[0] + 6, WINDOW[1] + 8],
    }
    capsys.readouterr()
    assert main(common + ["--output", str(tmp_path / "c"), "--crop-noise", "3", "4"]) == 2
    assert "--window-noise" in capsys.readouterr().err
    assert main(common + ["--output", str(tmp_path / "d"), "--window-noise", "--size-noise", "-1"]) == 2
    assert ">= 0" in capsys.readouterr().err
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,patient,laterality,view,benign,malignant,split\n")
    assert (
        main(
            [
                "cache",
                "--source",
                "manifest",
                "--manifest",
                str(manifest),
                "--output",
                str(tmp_path / "e"),
                "--window-noise",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "--window-noise needs --source exam-list" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


def test_cache_of_the_sample_exam(sample_exam_dir, tmp_path):
    """The real exam at 2944 x 1920 (CC views shorter than the window): cached draws equal
    noisy_window on the flipped crop; the benign masks are carried."""
    exam_dir = sample_exam_dir
    source = ExamListSource(exam_dir / "expected_exam_list.pkl", exam_dir / "images", exam_dir / "segmentation")
    assert build_cache(source, tmp_path / "c", window_noise=True) == (4, [])
    cached = CacheSource(tmp_path / "c")
    assert cached.window_noise["context_shape"] == [3344, 2320]
    exams = load_exam_list(exam_dir / "expected_exam_list.pkl")
    assert [item.name for item in source.items] == [exams[0][v][0] for v in VIEWS]
    for i in range(4):
        image, item = _flipped_image(source, i)
        drawn = cached.draw(i, np.random.default_rng(i))
        expected = W.noisy_window(image, item.view, item.best_center, (2944, 1920), np.random.default_rng(i))
        np.testing.assert_array_equal(drawn["image"][..., 0], _to_uint16(expected))
        np.testing.assert_array_equal(cached[i]["image"], source[i]["image"])
        if item.view.startswith("R"):  # the benign lesions: the drawn mask stays a lesion of similar size
            area = source[i]["mask"][..., 0].sum()
            assert area > 0 and 0.6 * area < drawn["mask"][..., 0].sum() < 1.6 * area
        else:
            assert not drawn["mask"].any()


# ------------------------------------------------------------------------ crop + resize on the device

# The tolerance between the device's float32 resize and PIL's (float64 sums, a float32 store
# between the passes), in units of the largest value resampled: each pass sums at most 7 taps
# (8 roundings of a sum whose terms add up in magnitude to at most 1.25 x the largest value, the
# cubic's negative lobes included) with weights each a few roundings off (normalised float32
# kernel values of an exactly rounded argument): <= 20 u per pass, u = 2^-24, and the second
# pass carries the first one's error. 40 u: 0.16 of a count at 65535 (measured: 0.078 at
# 2944 x 1920 on 16-bit noise, the worst case). At the crop's borders the same bound holds: there
# both cut the kernel at the crop and renormalise what is left (clamping or zero-padding the crop
# instead would be off by the size of the image's edges, hundreds of counts).
RESAMPLE_ULPS = 40


def _assert_resize_matches_pil(region, borders, window, device, rounded):
    """``device`` (the device's window of ``region`` cut at ``borders``) against PIL's: within the
    bound above; rounded, equal but where PIL's value lies within that bound of a half-integer, and
    there off by one count. Checked apart on the two-pixel ring along the borders."""
    host = W.crop_resized(region, borders, window).astype(np.float64)
    bound = RESAMPLE_ULPS * 2.0**-24 * float(np.abs(region).max())
    ring = np.zeros(window, bool)
    ring[:2], ring[-2:], ring[:, :2], ring[:, -2:] = True, True, True, True
    if not rounded:
        for part in (ring, ~ring):
            assert np.abs(device - host)[part].max() <= bound
        return
    np.testing.assert_array_equal(device, np.rint(device))
    expected = np.clip(np.rint(host), 0, 65535)
    off = device != expected
    assert np.abs(device - expected).max(initial=0) <= 1
    assert (np.abs(np.abs(host - np.floor(host)) - 0.5)[off] <= bound).all()  # only half-integer ties
    assert off.mean() < 0.01


@pytest.mark.parametrize("window, size_noise", [((128, 64), 8), ((2944, 1920), 100)], ids=["small", "full_size"])
def test_device_crop_resize_matches_pil(window, size_noise):
    """Crops smaller, larger and as large as the window, touching the region's edges or not, on
    12-bit smooth images and on 16-bit noise (whose sums round worst)."""
    from gmic_jax.resample import crop_resize

    rng = np.random.default_rng(0)
    region_shape = W.noise_region_shape(window, size_noise)
    wh, ww = window
    s = size_noise
    borders = [
        (s, s + wh, s, s + ww),  # the window's size: no resize
        (0, region_shape[0], 0, region_shape[1]),  # the largest crop, from edge to edge
        (2 * s, wh, 2 * s, ww),  # the smallest
        (3, 3 + wh + s // 2, s, s + ww - s // 3),  # taller and narrower
    ]
    yy, xx = np.mgrid[: region_shape[0], : region_shape[1]]
    smooth = (2000 + 1500 * np.sin(yy / 9.0) * np.cos(xx / 13.0)).astype(np.uint16)
    noise = rng.integers(0, 65536, region_shape).astype(np.uint16)
    # at full size the worst case alone (16-bit noise), to keep the suite's time
    for region in (smooth, noise) if window[0] < 1000 else (noise,):
        regions = np.stack([region] * len(borders))
        for rounded in (False, True):
            got = np.asarray(crop_resize(regions, np.array(borders), window, rounded=rounded))
            for k, b in enumerate(borders):
                _assert_resize_matches_pil(region, b, window, got[k], rounded)
    np.testing.assert_array_equal(got[0], region[s : s + wh, s : s + ww])  # no resize: the crop itself


def test_device_crop_resize_of_a_batch_is_that_of_each_example():
    """Bit for bit, so that the windows do not depend on how a batch is split over devices."""
    from gmic_jax.resample import crop_resize

    rng = np.random.default_rng(1)
    regions = rng.integers(0, 4096, (4, 144, 80)).astype(np.uint16)
    borders = np.array([[0, 144, 0, 80], [8, 136, 8, 72], [3, 140, 1, 70], [16, 128, 10, 78]])
    batch = np.asarray(crop_resize(regions, borders, (128, 64)))
    for k in range(4):
        np.testing.assert_array_equal(
            batch[k], np.asarray(crop_resize(regions[k : k + 1], borders[k : k + 1], (128, 64)))[0]
        )


def test_training_regions_carry_the_draws_of_the_host_path(caches):
    """noisy_region ships the draw noisy_example makes with PIL: the same crop (its pixels cut from
    the stored context at the same borders) and, resized on the device, the same window."""
    from gmic_jax.resample import crop_resize

    _, _, noise = caches
    # the rows of the tallest crop, the contexts' whole width (a contiguous block to copy)
    assert noise.region_shape == (WINDOW[0] + 2 * NOISE[1], noise.window_noise["context_shape"][1])
    regions, borders, hosts = [], [], []
    for i in range(len(noise)):
        for epoch in (0, 1):
            r = noise.noisy_region(i, epoch, seed=3)
            assert r["region"].shape == noise.region_shape and r["region"].dtype == np.uint16
            assert r["borders"].dtype == np.int32 and r["borders"].shape == (4,)
            np.testing.assert_array_equal(r["label"], noise[i]["label"])
            host = noise.noisy_example(i, epoch, seed=3, with_masks=False)["image"][..., 0]
            b = r["borders"]
            crop = r["region"][b[0] : b[1], b[2] : b[3]]
            np.testing.assert_array_equal(
                host, _to_uint16(W.crop_resized(crop, (0, crop.shape[0], 0, crop.shape[1]), WINDOW))
            )
            regions.append(r["region"])
            borders.append(b)
            hosts.append(host)
    windows = np.asarray(crop_resize(np.stack(regions), np.stack(borders), WINDOW))
    for region, b, window in zip(regions, borders, windows):
        _assert_resize_matches_pil(region, b, WINDOW, window, rounded=True)
    # every draw its own window; the device's agree with the host's but for half-integer ties
    assert len({h.tobytes() for h in hosts}) == len(hosts)
    assert np.mean([np.mean(w != h) for w, h in zip(windows, hosts)]) < 0.01


# --------------------------------------------------------------------------------------- training


def test_an_unreadable_training_example_stops_training_naming_it(
    caches, tmp_path, monkeypatch, compile_cache_in_process
):
    from gmic_jax.train.loop import DataFailure, train_and_evaluate

    _, _, noise = caches
    draw = CacheSource.noisy_region

    def broken(self, index, epoch, seed):
        if index == 5:
            raise DataError("contexts-00001.npy", "example 5: short read")
        return draw(self, index, epoch, seed)

    monkeypatch.setattr(CacheSource, "noisy_region", broken)
    c = _training_config(noise, epochs=1, workers=0)
    with pytest.raises(
        DataFailure,
        match=r"1 training example\(s\) of step \d could not be loaded:\n"
        r"  contexts-00001.npy: example 5: short read\n"
        r"stopped; last good checkpoint: step (None|1) in ",
    ):
        train_and_evaluate(c, tmp_path / "run")


def test_grain_workers_give_the_same_noisy_batches(caches):
    """Through worker processes, each example's draw is still the one of (seed, epoch, example):
    every batch equals the in-process one bit for bit, over an epoch boundary and from a later start."""
    from gmic_jax.data.pipeline import load_batches
    from gmic_jax.train.input import TrainExamples, TrainPlan
    from gmic_jax.train.sampling import source_labels

    _, _, noise = caches
    plan = TrainPlan(source_labels(noise), batch_size=4, steps_per_epoch=2, num_steps=6, seed=3, balanced=False)
    examples = TrainExamples(noise, seed=3, window_noise=True)
    expected = [batch_lib.stack([noise.noisy_region(i, e, 3) for i, e in plan[k]]) for k in range(len(plan))]
    assert [sorted(i for k in (2 * e, 2 * e + 1) for i, _ in plan[k]) for e in range(3)] == [list(range(8))] * 3
    assert [{e for _, e in plan[k]} for k in range(6)] == [{0}, {0}, {1}, {1}, {2}, {2}]  # fresh draws per epoch
    for workers, start in ((0, 0), (2, 0), (2, 3)):
        with load_batches(plan, examples, workers=workers, start=start) as batches:
            got = list(batches)
        assert len(got) == len(plan) - start
        for want, batch in zip(expected[start:], got):
            assert set(batch_lib.device_arrays(batch)) == {"region", "borders", "label"}
            for key in ("region", "borders", "label"):
                np.testing.assert_array_equal(batch[key], want[key])


def _training_config(noise, epochs, workers):
    """A tiny training on the window-noise cache (one compiled step shared by the tests here)."""
    import jax

    from gmic_jax.train.defaults import default_config

    c = default_config()
    c.data.source, c.data.window_noise, c.data.workers = "cache", True, workers
    c.data.train_cache = c.data.val_cache = str(noise.cache_dir)
    c.data.balanced_sampling = False
    c.model.image_shape, c.model.crop_shape, c.model.K = WINDOW, (32, 32), 1
    c.augment.enabled = False
    c.optimizer.schedule = "constant"  # the same steps whether a run is planned for 1 or 2 epochs
    c.batch_size, c.num_epochs, c.eval.every_epochs = 4 * jax.device_count(), epochs, 0
    c.progress_bar, c.seed = False, 5
    return c


def test_training_draws_noisy_windows_and_a_resumed_run_with_workers_draws_the_same(
    caches, tmp_path, monkeypatch, compile_cache_in_process
):
    """Two epochs straight, loading in this process (where the draws are counted: one per example
    and epoch), against one epoch and a resume for the second, loading in a worker process:
    the same parameters bit for bit. The resumed run's workers draw epoch 1's windows from (seed,
    epoch, example) alone, as the straight run did (epoch 0's draws again would train on other
    windows). That a SIGKILLed run resumes on the data of its step is tests/test_train_resume.py."""
    import jax

    from gmic_jax.checkpoint import load_checkpoint
    from gmic_jax.train.loop import train_and_evaluate

    _, _, noise = caches
    calls = []
    draw = CacheSource.noisy_region

    def counting(self, index, epoch, seed):
        calls.append((index, epoch, seed))
        return draw(self, index, epoch, seed)

    with monkeypatch.context() as m:
        m.setattr(CacheSource, "noisy_region", counting)
        train_and_evaluate(_training_config(noise, epochs=2, workers=0), tmp_path / "straight")
    assert sorted(calls) == [(i, e, 5) for i in range(8) for e in (0, 1)]
    train_and_evaluate(_training_config(noise, epochs=1, workers=1), tmp_path / "resumed")
    train_and_evaluate(_training_config(noise, epochs=2, workers=1), tmp_path / "resumed", config_changes_ok=True)
    steps = 2 * 8 // (4 * jax.device_count())
    a, b = (load_checkpoint(tmp_path / run, step=steps)[1] for run in ("straight", "resumed"))
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)
