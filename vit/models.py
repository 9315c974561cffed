"""Building the timm backbone of a run: a timm name, the hub's weights or a local checkpoint.

The classification head is always a fresh one sized for the task: a checkpoint's own head (1000
ImageNet classes, 21,843 for ImageNet-21k, or none) is dropped, as every method trains the head.
A local checkpoint must fit the architecture exactly (apart from the head): a missing or
unexpected backbone tensor is an error, never a silently random layer.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionpeft import tensorfiles
from visionpeft.errors import ConfigError

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def _create(name: str, pretrained: bool, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ConfigError(f"model.kwargs: {err}; use the keyword arguments of timm's VisionTransformer") from err
    except RuntimeError as err:
        if "pretrained tag" in str(err).lower():
            raise ConfigError(f"model.pretrained: {err}") from err
        raise
    except OSError as err:
        # huggingface_hub's offline and not-found errors are OSErrors.
        raise ConfigError(
            f"model.pretrained: the weights of {name!r} could not be fetched ({type(err).__name__}: {err}). "
            "Offline, download them once and pass model.checkpoint with model.pretrained: false"
        ) from err


_CHECKPOINT_FIX = "give a complete checkpoint file (download or copy it again)"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a local checkpoint; a damaged file or a pickle ``weights_only`` refuses raises ConfigError."""
    what = {"error": ConfigError, "fix": _CHECKPOINT_FIX, "key": "model.checkpoint"}
    try:
        if path.suffix == ".safetensors":
            state = tensorfiles.read_safetensors(path, **what)
        else:
            state = tensorfiles.read_torch(path, weights=True, **what)
    except OSError as err:
        raise ConfigError(f"model.checkpoint: {path} could not be read ({err.strerror or err})") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"model.checkpoint: {path} holds no state dict of tensors")
    return state


def load_backbone(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the backbone weights of a local checkpoint into a timm ViT, strictly, keeping its head.

    ``.npz`` files (Google's JAX ViTs, as VPT used) go through timm's own loader; other files are
    converted by timm's ``checkpoint_filter_fn`` (OpenAI CLIP layouts, position-embedding
    resampling for another image size) and must then match every backbone tensor.
    """
    path = Path(path)
    head = {k: v.clone() for k, v in model.get_classifier().state_dict().items()}
    if path.suffix == ".npz":
        try:
            model.load_pretrained(str(path))
        except (KeyError, ValueError, RuntimeError) as err:
            raise ConfigError(f"model.checkpoint: {path} does not fit {type(model).__name__} ({err})") from err
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(_read_state_dict(path), model)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ConfigError(f"model.checkpoint: {path.name} does not fit the model: {err}") from err
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise ConfigError(
                f"model.checkpoint: {path.name} does not fit {model.default_cfg.get('architecture', 'the model')} "
                f"with these model.kwargs: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
    model.get_classifier().load_state_dict(head)


def build_vit(
    name: str,
    num_classes: int,
    pretrained: bool | str = False,
    checkpoint: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm ViT named ``name`` with a fresh ``num_classes`` head.

    ``pretrained`` loads the hub's weights (``True``, or a tag such as ``"orig_in21k"``); a local
    ``checkpoint`` (``.safetensors``, ``.pth``, ``.npz``) is loaded strictly by
    :func:`load_backbone`. Without either, the backbone is randomly initialised. Errors name the
    run-config key to fix.
    """
    import timm

    base = name.split(".")[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(f"model.name: {name!r} is not a timm model; closest names: {close or 'none'}")
    if isinstance(pretrained, str):
        name = f"{base}.{pretrained}"
        pretrained = True
    if checkpoint is None:
        return _create(name, bool(pretrained), num_classes, dict(kwargs))
    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"model.checkpoint: {path} does not exist")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ConfigError(f"model.checkpoint: {path.name} is not one of {list(CHECKPOINT_SUFFIXES)}")
    if pretrained:
        raise ConfigError("model.checkpoint: give either model.checkpoint or model.pretrained: true, not both")
    model = _create(name, False, num_classes, dict(kwargs))
    load_backbone(model, path)
    return model
