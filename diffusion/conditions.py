"""Condition images for T2I-Adapter, built in and offline: Canny edges and a grayscale sketch.

T2I-Adapter's released edge adapters take single-channel control images with bright strokes on a
dark background (``in_channels=1``; diffusers#6275), which is what both extractors return, as PIL
``"L"`` images the size of the input. Nothing here downloads an annotator model, and OpenCV is not
needed: the Canny detector is written with torch (Gaussian blur, Sobel gradients, non-maximum
suppression, double threshold and hysteresis), with OpenCV's conventions for the thresholds
(unnormalised 3x3 Sobel responses, L1 magnitude by default, so the common ``100 / 200`` on 0-255
images means the same thing as ``cv2.Canny(img, 100, 200)``).

- ``"canny"``: :func:`canny`; white edge pixels (255) on black (0).
- ``"sketch"``: :func:`sketch`, a "pencil" colour-dodge sketch of the grayscale image (the grayscale
  divided by its blurred copy, i.e. dodged by its blurred negative), inverted so that strokes are
  bright on black like the T2I-Adapter sketch conditions; ``invert=False`` gives the dark-on-white
  pencil look.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from visionpeft.errors import ConfigError, DataError

KINDS = ("canny", "sketch")

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)


def extract(image: Image.Image, kind: str, **options: Any) -> Image.Image:
    """The condition image of ``kind`` (one of :data:`KINDS`) for ``image``, as a PIL ``"L"`` image.

    ``options`` go to the extractor (:func:`canny`: ``low_threshold``, ``high_threshold``,
    ``sigma``, ``l2_gradient``; :func:`sketch`: ``sigma``, ``invert``, ``floor``).
    """
    if kind == "canny":
        return canny(image, **options)
    if kind == "sketch":
        return sketch(image, **options)
    raise ConfigError(
        f"condition kind {kind!r} is unknown; choose one of {list(KINDS)} or give a folder of condition images"
    )


def _gray(image: Image.Image) -> torch.Tensor:
    """The image as a float64 ``(H, W)`` tensor of luma values in 0-255 (PIL's ITU-R 601-2 ``"L"``)."""
    if not isinstance(image, Image.Image):
        raise DataError(f"expected a PIL image, got {type(image).__name__}; open files with PIL.Image.open")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels have no defined colour; put them on black, as an edge map's background.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float64).copy())


def gaussian_blur(gray: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur an ``(H, W)`` tensor with a separable Gaussian of ``sigma`` px (radius ``ceil(3 sigma)``).

    Borders are reflected, so a uniform image stays uniform. ``sigma = 0`` returns the input.
    """
    if sigma < 0:
        raise ConfigError(f"sigma {sigma!r} must be >= 0")
    if sigma == 0:
        return gray
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=gray.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = gray[None, None]
    pad_h, pad_w = min(radius, gray.shape[0] - 1), min(radius, gray.shape[1] - 1)
    # Reflect padding needs pad < size; tiny images fall back to replicating the edge.
    mode_h = "reflect" if pad_h == radius else "replicate"
    mode_w = "reflect" if pad_w == radius else "replicate"
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode=mode_h), kernel.view(1, 1, -1, 1))
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode=mode_w), kernel.view(1, 1, 1, -1))
    return out[0, 0]


def sobel(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised 3x3 Sobel derivatives ``(gx, gy)`` of an ``(H, W)`` tensor (replicated borders).

    ``gx`` grows to the right and ``gy`` downwards, as OpenCV's ``Sobel(dx=1)`` / ``(dy=1)``.
    """
    kx = _SOBEL_X.to(gray.dtype)
    kernels = torch.stack([kx, kx.T])[:, None]
    padded = F.pad(gray[None, None], (1, 1, 1, 1), mode="replicate")
    g = F.conv2d(padded, kernels)[0]
    return g[0], g[1]


def non_maximum_suppression(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Keep the pixels whose magnitude is a local maximum across the edge; others become 0.

    The gradient direction is quantised into four sectors (0, 45, 90, 135 degrees), as in Canny's
    paper and OpenCV; a pixel survives when it is strictly greater than one neighbour along the
    gradient and not smaller than the other, so a plateau two pixels wide keeps one pixel.
    """
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    padded = F.pad(magnitude[None, None], (1, 1, 1, 1))[0, 0]
    h, w = magnitude.shape

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    # (dy, dx) of the neighbour along the gradient for each sector; image rows grow downwards.
    sectors = [
        ((angle < 22.5) | (angle >= 157.5), (0, 1)),
        ((angle >= 22.5) & (angle < 67.5), (1, 1)),
        ((angle >= 67.5) & (angle < 112.5), (1, 0)),
        ((angle >= 112.5) & (angle < 157.5), (1, -1)),
    ]
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for mask, (dy, dx) in sectors:
        forward, backward = shifted(dy, dx), shifted(-dy, -dx)
        keep |= mask & (magnitude > backward) & (magnitude >= forward)
    return torch.where(keep, magnitude, torch.zeros_like(magnitude))


def hysteresis(strong: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    """The pixels of ``weak`` 8-connected (through ``weak``) to a pixel of ``strong``; boolean masks.

    A depth-first search from every strong pixel over the weak ones: linear in the number of weak
    pixels, where growing the strong set by dilation would take one pass per pixel of the longest
    weak chain.
    """
    weak_np = weak.numpy()
    edges = (strong & weak).numpy().copy()
    h, w = edges.shape
    stack = [tuple(p) for p in np.argwhere(edges)]
    neighbours = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    while stack:
        y, x = stack.pop()
        for dy, dx in neighbours:
            ny, nx = y + dy, x + dx
            if 0 <= ny < h and 0 <= nx < w and weak_np[ny, nx] and not edges[ny, nx]:
                edges[ny, nx] = True
                stack.append((ny, nx))
    return torch.from_numpy(edges)


def canny(
    image: Image.Image,
    low_threshold: float = 100.0,
    high_threshold: float = 200.0,
    sigma: float = 1.4,
    l2_gradient: bool = False,
) -> Image.Image:
    """Canny edges of ``image``: a PIL ``"L"`` image, 255 on edge pixels and 0 elsewhere.

    The luma image (0-255) is blurred with a Gaussian of ``sigma`` px (1.4, the classic choice; 0
    turns it off), differentiated with 3x3 Sobel kernels, thinned by non-maximum suppression, and
    thresholded: pixels above ``high_threshold`` are edges, and pixels above ``low_threshold`` are
    edges when they connect to one. The magnitude is ``|gx| + |gy|`` (OpenCV's default) or, with
    ``l2_gradient``, ``sqrt(gx² + gy²)``; thresholds are on that unnormalised scale as in OpenCV.
    """
    if low_threshold < 0 or high_threshold < 0:
        raise ConfigError(f"Canny thresholds must be >= 0, got low {low_threshold!r} and high {high_threshold!r}")
    if low_threshold > high_threshold:
        raise ConfigError(
            f"Canny low_threshold {low_threshold!r} is above high_threshold {high_threshold!r}; swap them "
            "(the common pair is 100 / 200)"
        )
    gray = gaussian_blur(_gray(image), sigma)
    gx, gy = sobel(gray)
    magnitude = torch.hypot(gx, gy) if l2_gradient else gx.abs() + gy.abs()
    thin = non_maximum_suppression(magnitude, gx, gy)
    edges = hysteresis(thin > high_threshold, thin > low_threshold)
    return Image.fromarray(edges.numpy().astype(np.uint8) * 255)


def sketch(image: Image.Image, sigma: float = 3.0, invert: bool = True, floor: float = 16.0) -> Image.Image:
    """A grayscale pencil sketch of ``image`` (colour dodge), as a PIL ``"L"`` image.

    The colour dodge of the grayscale by its blurred negative, ``gray * 255 / blur(gray, sigma)``,
    turns flat regions white and leaves dark strokes on the darker side of every intensity change,
    ``sigma`` px wide. ``floor`` is added to both terms so that flat dark regions read as paper too
    (the plain dodge keeps black black, and amplifies the noise of dark regions into strokes). With
    ``invert`` (the default) the result is negated, so strokes are bright on black as T2I-Adapter's
    sketch conditions are.
    """
    if sigma <= 0:
        raise ConfigError(f"sketch sigma {sigma!r} must be > 0 (it sets the stroke width in pixels)")
    if floor <= 0:
        raise ConfigError(f"sketch floor {floor!r} must be > 0")
    gray = _gray(image)
    blurred = gaussian_blur(gray, sigma)
    dodge = ((gray + floor) * 255.0 / (blurred + floor)).clamp(0.0, 255.0)
    out = 255.0 - dodge if invert else dodge
    return Image.fromarray(out.round().numpy().astype(np.uint8))
