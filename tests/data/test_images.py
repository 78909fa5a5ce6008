"""One image normalisation for engine and learner: whatever transparency or orientation a training
image carries, load_images hands both sides the same plain RGB pixels, with nothing left to convert.

Expectations are computed here with numpy from the palette / channels that made each test image,
not with the code under test. Sizes are multiples of 28 within the pixel limits, so the resize in
qwen_vl_utils.fetch_image keeps every pixel and load_images' output can be compared exactly.
"""

import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import MAX_PIXELS, MIN_PIXELS
from visualthinker_ray.data.prompts import load_images, plain_rgb
from visualthinker_ray.data.records import PromptRecord

WHITE = np.array([255, 255, 255], dtype=np.uint8)
SIZE = (56, 84)  # (width, height): 4704 pixels, a multiple of 28 each way, within the limits
KEY = 2  # the transparent palette index
PALETTE = np.array([[10, 20, 30], [200, 40, 60], [90, 250, 5], [0, 0, 255], [128, 128, 128]], dtype=np.uint8)


def encoded(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **save)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def loaded(data: bytes) -> Image.Image:
    rec = PromptRecord(id="r0", images=(data,), question="q", gold="a", choices=("a", "b"))
    (img,) = load_images(rec, MIN_PIXELS, MAX_PIXELS)
    return img


def indices() -> np.ndarray:
    """Every palette index, the transparent one included, in a pattern (rows of height x width)."""
    w, h = SIZE
    return ((np.arange(h)[:, None] + 2 * np.arange(w)[None, :]) % len(PALETTE)).astype(np.uint8)


def palette_png() -> bytes:
    img = Image.fromarray(indices(), mode="P")
    img.putpalette(PALETTE.flatten().tolist())
    return encoded(img, transparency=KEY)


def blend(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """rgb over white with alpha in 0..255 (float; PIL rounds, so compare within 1)."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1.0 - a)


def whiten_key_colour(img: Image.Image) -> Image.Image:
    """What vLLM 0.33's convert_image_mode does to an RGB image that still carries
    info["transparency"] (written out here, vLLM 0.33 does not install on this machine): the pixels
    of the key colour go white. vLLM 0.32 and transformers keep them."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def assert_plain(img: Image.Image) -> None:
    assert img.mode == "RGB"
    assert "transparency" not in img.info and img.info == {}, img.info


def test_a_palette_png_with_a_transparent_index_becomes_plain_rgb_with_the_key_on_white():
    data = palette_png()
    assert decoded(data).mode == "P" and decoded(data).info["transparency"] == KEY
    idx = indices()
    expected = np.where((idx == KEY)[..., None], WHITE, PALETTE[idx])
    for out in (plain_rgb(decoded(data)), loaded(data)):
        assert_plain(out)
        assert out.size == SIZE
        np.testing.assert_array_equal(np.asarray(out), expected)


def test_the_palette_input_is_the_case_where_vllm_versions_disagree():
    """Without the normalisation qwen_vl_utils.fetch_image makes an RGB image that keeps the key colour
    in info["transparency"] and has pixels of that colour: 0.33-style whitening changes them (the
    engine would see another picture than the learner). After it, whitening changes nothing."""
    from qwen_vl_utils import fetch_image

    raw = fetch_image({"image": decoded(palette_png()), "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS})
    key_colour = tuple(int(v) for v in PALETTE[KEY])
    assert raw.mode == "RGB" and raw.info.get("transparency") == key_colour
    kept = np.asarray(raw)
    is_key = (kept == PALETTE[KEY]).all(axis=-1)
    assert is_key.sum() == (indices() == KEY).sum() > 0  # the key colour is there
    whitened = np.asarray(whiten_key_colour(raw))
    assert (whitened != kept).any(axis=-1).sum() == is_key.sum()  # exactly those pixels change
    out = loaded(palette_png())
    np.testing.assert_array_equal(np.asarray(whiten_key_colour(out)), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(out), whitened)  # the one choice: transparent is white


def test_rgba_and_la_are_composited_onto_white():
    w, h = SIZE
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = rng.choice(np.array([0, 64, 128, 200, 255], dtype=np.uint8), (h, w))
    grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
    cases = {
        "RGBA": (Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA"), blend(rgb, alpha)),
        "LA": (
            Image.fromarray(np.dstack([grey, alpha]), mode="LA"),
            blend(np.repeat(grey[..., None], 3, axis=-1), alpha),
        ),
    }
    for mode, (img, expected) in cases.items():
        data = encoded(img)
        assert decoded(data).mode == mode
        for out in (plain_rgb(decoded(data)), loaded(data)):
            assert_plain(out)
            got = np.asarray(out).astype(np.float64)
            assert np.abs(got - expected).max() <= 1.0, mode
            opaque, clear = alpha == 255, alpha == 0
            np.testing.assert_array_equal(got[opaque], np.round(expected[opaque]))
            assert (got[clear] == 255).all(), mode


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_transparent_key_colour_of_grey_and_rgb_pngs_goes_white(mode):
    idx = indices()
    grey = (idx * 50).astype(np.uint8)  # five grey levels; level KEY * 50 is transparent
    if mode == "L":
        img, key, pixels = Image.fromarray(grey, mode="L"), int(KEY * 50), np.repeat(grey[..., None], 3, -1)
    else:
        img, key, pixels = (
            Image.fromarray(PALETTE[idx], mode="RGB"),
            tuple(int(v) for v in PALETTE[KEY]),
            PALETTE[idx],
        )
    data = encoded(img, transparency=key)
    assert decoded(data).info["transparency"] == key
    expected = np.where((idx == KEY)[..., None], WHITE, pixels)
    for out in (plain_rgb(decoded(data)), loaded(data)):
        assert_plain(out)
        np.testing.assert_array_equal(np.asarray(out), expected)


def test_the_exif_orientation_is_applied_once_and_dropped():
    """vLLM rotates an image by its EXIF orientation, transformers does not: load_images rotates it
    and drops the tag, so both see the image as displayed."""
    w, h = SIZE
    rgb = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encoded(Image.fromarray(rgb, mode="RGB"), exif=exif.tobytes())
    assert decoded(data).getexif().get(0x0112) == 6
    out = loaded(data)
    assert_plain(out)
    assert out.size == (h, w)
    np.testing.assert_array_equal(np.asarray(out), np.rot90(rgb, k=-1))
    assert out.getexif().get(0x0112) is None


def test_an_opaque_rgb_png_is_unchanged():
    rgb = PALETTE[indices()]
    out = loaded(encoded(Image.fromarray(rgb, mode="RGB")))
    assert_plain(out)
    np.testing.assert_array_equal(np.asarray(out), rgb)
