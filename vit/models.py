"""Building the timm backbone of a run: a timm name, the hub's weights or a local checkpoint.

The classification head is always a fresh one sized for the task: a checkpoint's own head (1000
ImageNet classes, 21,843 for ImageNet-21k, or none) is dropped, as every method trains the head.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from torch import nn

from visionpeft.errors import ConfigError

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def build_vit(
    name: str,
    num_classes: int,
    pretrained: bool | str = False,
    checkpoint: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm ViT named ``name`` with a fresh ``num_classes`` head.

    ``pretrained`` loads the hub's weights (``True``, or a tag such as ``"orig_in21k"``); a local
    ``checkpoint`` (``.safetensors``, ``.pth``, ``.npz``) is loaded through timm's own loader,
    which also resamples the position embedding when the image size differs. Without either,
    the backbone is randomly initialised.
    """
    import timm

    base = name.split(".")[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(f"model.name: {name!r} is not a timm model; closest names: {close or 'none'}")
    kwargs = dict(kwargs)
    if isinstance(pretrained, str):
        name = f"{name.split('.')[0]}.{pretrained}"
        pretrained = True
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ConfigError(f"model.checkpoint: {path} does not exist")
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ConfigError(f"model.checkpoint: {path.name} is not one of {list(CHECKPOINT_SUFFIXES)}")
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", {}), file=str(path))
        # timm drops the checkpoint's head when its class count differs from the config's; a
        # sentinel count makes sure that happens for every checkpoint.
        overlay.setdefault("num_classes", -1)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                                 **kwargs)
    return timm.create_model(name, pretrained=bool(pretrained), num_classes=num_classes, **kwargs)
