"""Image preprocessing of the ViT papers (VPT, NOAH, V-PETL Bench) and the normalisation to pair it with.

* ``vtab``: resize straight to ``image_size`` x ``image_size``, no crop and no augmentation, in training
  too (VPT's ``tf.image.resize`` to 224, NOAH's ``--direct_resize``).
* ``fgvc``: VPT's FGVC pipeline, ``Resize(256)`` → ``RandomCrop(224)`` + horizontal flip for training,
  ``Resize(256)`` → ``CenterCrop(224)`` for evaluation; 256 scales with ``image_size``.
* ``none``: no resizing, cropping or augmentation (the images must already have the model's size).

Every kind ends with a float tensor ``(C, H, W)`` normalised with ``mean`` / ``std``. Geometric steps run
on the PIL image, as the original code does, so the resampling filter is PIL's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from visionpeft.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

TRANSFORM_KINDS = ("vtab", "fgvc", "none")
NORMALIZATIONS = ("model", "imagenet", "inception")


def build_transform(kind: str, train: bool, image_size: int = 224, mean: Sequence[float] | None = IMAGENET_MEAN,
                    std: Sequence[float] | None = IMAGENET_STD, interpolation: str = "bicubic") -> Callable[[Any], Any]:
    """The preprocessing ``kind`` (``vtab``, ``fgvc`` or ``none``) for training or evaluation.

    Takes a PIL image and returns a float tensor ``(C, H, W)``. ``mean``/``std`` normalise the result
    (see :func:`normalization_for`); pass ``None`` for both to keep values in [0, 1].
    ``interpolation`` names a torchvision ``InterpolationMode`` (``bicubic`` as NOAH; VPT's VTAB
    pipeline resized bilinearly).
    """
    import torch
    from torchvision.transforms import InterpolationMode, v2

    if kind not in TRANSFORM_KINDS:
        raise ConfigError(f"transform: {kind!r} is not supported; choose one of {list(TRANSFORM_KINDS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size: {image_size!r} must be a positive integer")
    if (mean is None) != (std is None):
        raise ConfigError("mean and std: give both, or neither to skip normalisation")
    try:
        mode = InterpolationMode(interpolation)
    except ValueError:
        choices = [m.value for m in InterpolationMode]
        raise ConfigError(f"interpolation: {interpolation!r} is not supported; choose one of {choices}") from None

    steps: list[Any] = []
    if kind == "vtab":
        steps.append(v2.Resize((image_size, image_size), interpolation=mode))
    elif kind == "fgvc":
        steps.append(v2.Resize(image_size * 256 // 224, interpolation=mode))
        if train:
            steps += [v2.RandomCrop(image_size), v2.RandomHorizontalFlip()]
        else:
            steps.append(v2.CenterCrop(image_size))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if mean is not None:
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"mean and std: need 3 values each (RGB), got {list(mean)} and {list(std)}")
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)


def normalization_for(model: nn.Module | None, stats: str = "model") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` to normalise inputs with.

    ``model``: the statistics the checkpoint was trained with, from timm's ``pretrained_cfg`` on the model
    or any submodule (so wrapped models work); ImageNet's when there is none (or ``model`` is ``None``).
    ``imagenet``: (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), as VPT. ``inception``: 0.5 / 0.5, the
    [-1, 1] range Google's IN-21k ViTs were trained with, as NOAH's VPT runs.
    """
    if stats == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if stats == "inception":
        return INCEPTION_MEAN, INCEPTION_STD
    if stats != "model":
        raise ConfigError(f"normalization: {stats!r} is not supported; choose one of {list(NORMALIZATIONS)}")
    if model is not None:
        for module in model.modules():
            cfg = getattr(module, "pretrained_cfg", None)
            if isinstance(cfg, dict) and cfg.get("mean") is not None and cfg.get("std") is not None:
                return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    return IMAGENET_MEAN, IMAGENET_STD
