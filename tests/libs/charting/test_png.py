"""The PNG encoder writes the pixels it is given, as an independent decoder (Pillow) reads them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from libs.charting.png import encode_png


def _decoded(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.mode == "RGB"
    return np.asarray(image)


def test_rgba_buffer_drops_alpha_and_keeps_every_pixel():
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, size=(37, 53, 4), dtype=np.uint8)  # odd sizes: no row padding luck
    np.testing.assert_array_equal(_decoded(encode_png(rgba)), rgba[:, :, :3])


def test_rgb_and_non_contiguous_input():
    rng = np.random.default_rng(8)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decoded(encode_png(rgb)), rgb)
    wide = rng.integers(0, 256, size=(20, 60, 4), dtype=np.uint8)
    view = wide[:, ::2]  # a strided view, as a slice of a canvas buffer would be
    np.testing.assert_array_equal(_decoded(encode_png(view)), view[:, :, :3])


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 3), np.float32)])
def test_rejects_what_is_not_an_image(bad):
    with pytest.raises(ValueError, match="expected"):
        encode_png(bad)
