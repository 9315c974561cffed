"""CoOp's image preprocessing (Dassl's ``build_transform`` with CoOp's configs) and CLIP's normalisation.

* train: ``RandomResizedCrop(size, scale=(0.08, 1.0))`` (bicubic) → horizontal flip → normalise
  (CoOp's ``["random_resized_crop", "random_flip", "normalize"]``);
* test: resize the shorter side to ``size`` (bicubic) → ``CenterCrop(size)`` → normalise.

The mean and std are CLIP's (``open_clip.OPENAI_DATASET_MEAN`` / ``STD``) unless given; the size is a
parameter because tiny test models use 32 px. Geometric steps run on the PIL image, as in Dassl.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from visionpeft.errors import ConfigError

CROP_SCALE = (0.08, 1.0)


def clip_mean_std() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """CLIP's normalisation statistics, from open_clip (``OPENAI_DATASET_MEAN``, ``OPENAI_DATASET_STD``)."""
    import open_clip

    return tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)


def model_preprocess(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """The input size, mean and std an open_clip model was built with (``model.visual.preprocess_cfg``).

    Falls back to ``visual.image_size`` and CLIP's statistics for models without a preprocess config.
    """
    visual = getattr(model, "visual", model)
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(visual, "image_size", None))
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ConfigError(f"the model's input size {tuple(size)} is not square; CoOp's transforms crop squares")
        size = size[0]
    if size is None:
        raise ConfigError("cannot tell the model's input size (no visual.image_size); give image_size")
    mean, std = clip_mean_std()
    return int(size), tuple(cfg.get("mean", mean)), tuple(cfg.get("std", std))


def build_transform(train: bool, image_size: int = 224, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, interpolation: str = "bicubic",
                    scale: tuple[float, float] = CROP_SCALE) -> Callable[[Any], Any]:
    """CoOp's training (``train=True``) or test transform: a PIL image in, a normalised float tensor out.

    ``mean``/``std`` default to CLIP's; ``interpolation`` names a torchvision ``InterpolationMode``;
    ``scale`` is the random crop's area range (Dassl's ``RRCROP_SCALE``).
    """
    import torch
    from torchvision.transforms import InterpolationMode, v2

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size: {image_size!r} must be a positive integer")
    if (mean is None) != (std is None):
        raise ConfigError("mean and std: give both, or neither for CLIP's")
    if mean is None:
        mean, std = clip_mean_std()
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"mean and std: need 3 values each (RGB), got {list(mean)} and {list(std)}")
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"scale: {scale!r} must be (low, high) with 0 < low <= high <= 1")
    try:
        mode = InterpolationMode(interpolation)
    except ValueError:
        choices = [m.value for m in InterpolationMode]
        raise ConfigError(f"interpolation: {interpolation!r} is not supported; choose one of {choices}") from None
    if train:
        steps: list[Any] = [v2.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=mode),
                            v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(image_size, interpolation=mode), v2.CenterCrop(image_size)]
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std)),
              v2.ToPureTensor()]
    return v2.Compose(steps)
