"""Readers: PNG (8/12/16-bit values kept) and DICOM (LUTs, inversion, padding, header metadata)."""

from __future__ import annotations

import numpy as np
import pytest

from gmic_jax.data.image import DataError, Mammogram, read_dicom, read_image, read_png, write_png
from gmic_jax.data.testing import corrupt_copy, write_dicom


def ramp(h=12, w=10, hi=4095):
    return (np.arange(h * w).reshape(h, w) * hi // (h * w - 1)).astype(np.uint16)


@pytest.mark.parametrize("dtype,hi,bits", [(np.uint8, 255, 8), (np.uint16, 4095, 16), (np.uint16, 65535, 16)])
def test_png_values_kept(tmp_path, dtype, hi, bits):
    arr = ramp(hi=hi).astype(dtype)
    write_png(tmp_path / "a.png", arr)
    image = read_png(tmp_path / "a.png", view="CC", laterality="L")
    assert image.pixels.dtype == np.float32
    np.testing.assert_array_equal(image.pixels, arr.astype(np.float32))  # 12-bit stays 0..4095
    assert image.bit_depth == bits and image.full_view == "L-CC"
    np.testing.assert_array_equal(image.to_uint(), arr)


def test_colour_and_corrupt_png(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"rgb\.png: colour PNG"):
        read_png(tmp_path / "rgb.png")
    write_png(tmp_path / "ok.png", ramp(200, 150))
    corrupt_copy(tmp_path / "ok.png", tmp_path / "cut.png", 0.5)
    with pytest.raises(DataError, match=r"cut\.png: corrupt or truncated PNG"):
        read_png(tmp_path / "cut.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(DataError, match=r"text\.png: not a PNG"):
        read_png(tmp_path / "text.png")
    with pytest.raises(DataError, match="file not found"):
        read_image(tmp_path / "missing.png")


@pytest.mark.parametrize("bits,hi", [(12, 4095), (16, 65535)])
def test_dicom_monochrome2_values_and_header(tmp_path, bits, hi):
    arr = ramp(hi=hi)
    path = write_dicom(tmp_path / "a.dcm", arr, bits_stored=bits, laterality="R", view="MLO")
    image = read_dicom(path)
    np.testing.assert_array_equal(image.pixels, arr.astype(np.float32))
    assert (image.laterality, image.view, image.bit_depth) == ("R", "MLO", bits)
    assert image.full_view == "R-MLO"


@pytest.mark.parametrize("bits,hi", [(12, 4095), (16, 65535)])
def test_dicom_monochrome1_inverted(tmp_path, bits, hi):
    arr = ramp(hi=hi)
    image = read_dicom(write_dicom(tmp_path / "a.dcm", arr, photometric="MONOCHROME1", bits_stored=bits))
    np.testing.assert_array_equal(image.pixels, (hi - arr.astype(np.int64)).astype(np.float32))


def test_dicom_voi_lut_sequence(tmp_path):
    arr = ramp(hi=4095)
    lut = (4095 - np.arange(4096)) // 2  # any monotone map: output = LUT[stored]
    image = read_dicom(write_dicom(tmp_path / "a.dcm", arr, bits_stored=12, voi_lut=lut))
    np.testing.assert_array_equal(image.pixels, lut[arr].astype(np.float32))
    raw = read_dicom(tmp_path / "a.dcm", apply_voi=False)
    np.testing.assert_array_equal(raw.pixels, arr.astype(np.float32))


def test_dicom_window_linear(tmp_path):
    arr = np.array([[0, 1000, 1500, 2000, 2047, 2048, 3000, 4095]], np.uint16)
    image = read_dicom(write_dicom(tmp_path / "a.dcm", arr, bits_stored=12, window=(2048, 1024)))
    c, w = 2048 - 0.5, 1024 - 1  # DICOM PS3.3 C.11.2.1.2.1 LINEAR
    x = arr.astype(np.float64)
    expected = np.clip(((x - c) / w + 0.5) * 4095, 0, 4095)
    expected[x <= c - w / 2] = 0
    expected[x > c + w / 2] = 4095
    np.testing.assert_allclose(image.pixels, expected.astype(np.float32), rtol=0, atol=1e-3)
    assert image.pixels[0, 0] == 0 and image.pixels[0, -1] == 4095


def test_dicom_monochrome1_with_window_inverts_window_output(tmp_path):
    arr = np.array([[0, 2048, 4095]], np.uint16)
    m2 = read_dicom(write_dicom(tmp_path / "m2.dcm", arr, bits_stored=12, window=(2048, 4096)))
    m1 = read_dicom(
        write_dicom(tmp_path / "m1.dcm", arr, bits_stored=12, window=(2048, 4096), photometric="MONOCHROME1")
    )
    np.testing.assert_allclose(m1.pixels, 4095 - m2.pixels, atol=1e-3)


def test_dicom_pixel_padding_becomes_background(tmp_path):
    arr = ramp(hi=4095)
    arr[:, :3] = 4095  # the padding value is the brightest one: padding must become background (0)
    arr[0, 5] = 4095
    image = read_dicom(
        write_dicom(tmp_path / "a.dcm", arr, bits_stored=12, photometric="MONOCHROME2", padding_value=4095)
    )
    pad = arr == 4095
    assert (image.pixels[pad] == 0).all()
    np.testing.assert_array_equal(image.pixels[~pad], arr[~pad].astype(np.float32))


def test_dicom_rescale_applied(tmp_path):
    arr = ramp(hi=1000)
    image = read_dicom(write_dicom(tmp_path / "a.dcm", arr, bits_stored=12, rescale=(2.0, 10.0)))
    np.testing.assert_allclose(image.pixels, arr * 2.0 + 10.0)


def test_dicom_bad_inputs(tmp_path):
    good = write_dicom(tmp_path / "good.dcm", ramp(64, 64, 4095), bits_stored=12)
    corrupt_copy(good, tmp_path / "cut.dcm", 0.6)
    with pytest.raises(DataError, match=r"cut\.dcm: (cannot decode|corrupt or truncated)"):
        read_dicom(tmp_path / "cut.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 50)
    with pytest.raises(DataError, match=r"junk\.dcm"):
        read_dicom(tmp_path / "junk.dcm")

    import pydicom

    ds = pydicom.dcmread(good)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(tmp_path / "palette.dcm")
    with pytest.raises(DataError, match=r"palette\.dcm: unsupported photometric interpretation 'PALETTE COLOR'"):
        read_dicom(tmp_path / "palette.dcm")


def test_read_image_dispatch_and_override(tmp_path):
    arr = ramp()
    write_png(tmp_path / "a.png", arr)
    write_dicom(tmp_path / "b.dcm", arr, bits_stored=12, laterality="L", view="CC")
    assert isinstance(read_image(tmp_path / "a.png"), Mammogram)
    assert read_image(tmp_path / "b.dcm").full_view == "L-CC"
    assert read_image(tmp_path / "b.dcm", view="MLO").full_view == "L-MLO"
    np.testing.assert_array_equal(read_image(tmp_path / "a.png").pixels, read_image(tmp_path / "b.dcm").pixels)
