"""The built-in T2I-Adapter condition extractors: Canny edges and the grayscale sketch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visionpeft.errors import ConfigError, DataError

conditions = pytest.importorskip("visionpeft.diffusion.conditions")


def _square(size: int = 64, top: int = 16, left: int = 20, height: int = 32, width: int = 20) -> Image.Image:
    image = np.zeros((size, size, 3), np.uint8)
    image[top : top + height, left : left + width] = 255
    return Image.fromarray(image)


def _sample_images() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    # Halved (china.jpg and flower.jpg are 427x640) to keep the tests fast.
    return [Image.fromarray(a).reduce(2) for a in load_sample_images().images]


def test_canny_finds_the_border_of_a_square_and_nothing_else():
    top, left, height, width = 16, 20, 32, 20
    edges = np.asarray(conditions.canny(_square(top=top, left=left, height=height, width=width)))
    assert edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 255}
    on = edges > 0
    ys, xs = np.nonzero(on)
    # Every edge pixel lies within one pixel of the square's boundary (between rows top-1/top, ...).
    inside_rows = (ys >= top - 1) & (ys <= top + height)
    inside_cols = (xs >= left - 1) & (xs <= left + width)
    near_vertical = (np.abs(xs - (left - 0.5)) <= 1) | (np.abs(xs - (left + width - 0.5)) <= 1)
    near_horizontal = (np.abs(ys - (top - 0.5)) <= 1) | (np.abs(ys - (top + height - 0.5)) <= 1)
    assert np.all(inside_rows & inside_cols & (near_vertical | near_horizontal))
    # ... and every side is found: each row / column crossing the square crosses two edge pixels' band.
    for y in range(top + 2, top + height - 2):
        assert on[y, left - 1 : left + 1].any() and on[y, left + width - 1 : left + width + 1].any(), y
        assert not on[y, left + 2 : left + width - 2].any()
    for x in range(left + 2, left + width - 2):
        assert on[top - 1 : top + 1, x].any() and on[top + height - 1 : top + height + 1, x].any(), x
    # Non-maximum suppression leaves a one-pixel line on a straight side.
    assert on[top + height // 2].sum() == 2


def test_canny_of_a_flat_image_is_empty():
    flat = Image.new("RGB", (40, 30), (90, 140, 200))
    assert not np.asarray(conditions.canny(flat)).any()


def test_canny_thresholds_on_a_real_photo():
    for image in _sample_images():
        default = np.asarray(conditions.extract(image, "canny")) > 0
        assert default.shape == (image.height, image.width)
        assert 0.005 < default.mean() < 0.3  # a photo has edges, but most pixels are not edges
        strict = np.asarray(conditions.canny(image, low_threshold=150, high_threshold=300)) > 0
        loose = np.asarray(conditions.canny(image, low_threshold=50, high_threshold=100)) > 0
        # Higher thresholds keep a subset: fewer strong seeds, fewer weak pixels to grow into.
        assert strict.sum() < default.sum() < loose.sum()
        assert not (strict & ~default).any() and not (default & ~loose).any()


def test_hysteresis_equals_connected_components():
    ndimage = pytest.importorskip("scipy.ndimage")
    image = _sample_images()[0]
    gray = conditions.gaussian_blur(conditions._gray(image), 1.4)
    gx, gy = conditions.sobel(gray)
    thin = conditions.non_maximum_suppression(gx.abs() + gy.abs(), gx, gy)
    strong, weak = (thin > 200).numpy(), (thin > 100).numpy()
    labels, _ = ndimage.label(weak, structure=np.ones((3, 3)))
    seeded = np.unique(labels[strong])
    expected = np.isin(labels, seeded[seeded > 0])
    got = conditions.hysteresis(torch.from_numpy(strong), torch.from_numpy(weak)).numpy()
    assert np.array_equal(got, expected)
    assert weak.sum() > got.sum() > strong.sum()  # the test exercises both kept and dropped weak pixels


def test_sobel_matches_the_kernel_on_a_ramp():
    ramp = torch.arange(8, dtype=torch.float64).repeat(6, 1) * 3.0  # +3 per column
    gx, gy = conditions.sobel(ramp)
    # Interior: (1 + 2 + 1) x (3 - (-3)) = 24; no vertical change.
    assert torch.equal(gx[1:-1, 1:-1], torch.full((4, 6), 24.0, dtype=torch.float64))
    assert torch.equal(gy, torch.zeros_like(gy))


def test_sketch_is_white_on_black_strokes_at_changes():
    sketch = np.asarray(conditions.extract(_square(), "sketch"), dtype=np.int32)
    assert sketch.shape == (64, 64)
    # Flat regions (inside the square, the background far from it) are black ...
    assert sketch[28:36, 26:34].max() == 0 and sketch[:4, :4].max() == 0
    # ... and the strokes sit where the intensity changes.
    assert sketch[30, 17:23].max() > 100
    dark = np.asarray(conditions.sketch(_square(), invert=False), dtype=np.int32)
    assert np.array_equal(dark, 255 - sketch)


def test_sketch_of_a_real_photo():
    image = _sample_images()[1]
    sketch = np.asarray(conditions.extract(image, "sketch", sigma=2.0))
    assert sketch.shape == (image.height, image.width)
    assert 0 < sketch.mean() < 128 and sketch.max() > 128


def test_modes_are_converted():
    for mode in ("L", "RGBA", "P", "I;16"):
        image = _square().convert(mode)
        assert conditions.canny(image).mode == "L"
    rgba = Image.new("RGBA", (32, 32), (255, 255, 255, 0))  # transparent white counts as black
    assert not np.asarray(conditions.canny(rgba)).any()


def test_bad_inputs():
    with pytest.raises(ConfigError, match="choose one of"):
        conditions.extract(_square(), "depth")
    with pytest.raises(ConfigError, match="swap"):
        conditions.canny(_square(), low_threshold=200, high_threshold=100)
    with pytest.raises(ConfigError, match="sigma"):
        conditions.sketch(_square(), sigma=0)
    with pytest.raises(DataError, match="PIL image"):
        conditions.extract(np.zeros((8, 8)), "canny")
