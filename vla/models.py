"""Building the open_clip model of a run: a model name with a pretrained tag, or a local checkpoint.

``model.name`` is an open_clip architecture (``ViT-B-16``, ``ViT-B-16-quickgelu``, ``RN50``, or a
``local-dir:`` folder with ``open_clip_config.json``). Weights come from ``model.pretrained`` (a tag
such as ``openai`` or ``laion2b_s34b_b88k``, downloaded by open_clip when online) or
``model.checkpoint`` (a local ``.safetensors`` file or a weights-only ``.pt`` / ``.bin`` file),
which open_clip loads strictly; a pickled checkpoint or an OpenAI TorchScript archive is refused
(``torch.load(weights_only=True)``) with the command that converts it. ``model.kwargs`` go to
``open_clip.create_model``: ``precision`` (``fp32``; ``fp16`` / ``bf16`` are OpenAI-style
low-precision weights with fp32 LayerNorms, what the papers trained with), ``force_quick_gelu``,
``force_image_size``, ...

The OpenAI weights were trained with QuickGELU; open_clip's plain ``ViT-B-16`` config uses
nn.GELU and only warns in its log. :func:`check_activation` turns that into a visionpeft
warning that says how to fix it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from visionpeft import tensorfiles
from visionpeft.errors import ConfigError

logger = logging.getLogger("visionpeft")


def _model_quick_gelu(name: str, kwargs: dict[str, Any]) -> bool | None:
    import open_clip

    if kwargs.get("force_quick_gelu"):
        return True
    config = open_clip.get_model_config(name)
    if config is None:
        return None
    return bool(config.get("quick_gelu", False))


def check_activation(name: str, pretrained: str | None, kwargs: dict[str, Any]) -> str | None:
    """A warning text when the model's activation does not match the pretrained tag's, else ``None``."""
    import open_clip

    if not pretrained:
        return None
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
    if "quick_gelu" not in tag_cfg:
        return None
    wanted = bool(tag_cfg["quick_gelu"])
    built = _model_quick_gelu(name, kwargs)
    if built is None or built == wanted:
        return None
    if wanted:
        fix = f"use model.name: {name}-quickgelu, or model.kwargs.force_quick_gelu: true"
        return (f"the {pretrained!r} weights of {name} were trained with QuickGELU, but {name} builds nn.GELU: "
                f"features will be off; {fix}")
    return (f"the {pretrained!r} weights of {name} were trained with nn.GELU, but the model is built with QuickGELU; "
            "drop -quickgelu from model.name or force_quick_gelu from model.kwargs")


def _load_error(err: Exception, name: str, pretrained: str | None, checkpoint: str | None) -> ConfigError | None:
    """The error to raise for what ``open_clip.create_model`` raised, naming the key to fix; ``None``: re-raise it."""
    if isinstance(err, TypeError):
        return ConfigError(f"model.kwargs: {err}; use open_clip.create_model's keyword arguments")
    if checkpoint is not None:
        problem = tensorfiles.reader_problem(err)
        if problem is not None:
            fix = tensorfiles.conversion_hint(checkpoint, err) or "give a complete checkpoint file (copy it again)"
            return ConfigError(f"model.checkpoint: {checkpoint} {problem}; {fix}")
        if isinstance(err, OSError):
            return ConfigError(f"model.checkpoint: {checkpoint} could not be read ({err.strerror or err})")
        # The architecture was checked above, so what else fails is the file not fitting it.
        return ConfigError(f"model.checkpoint: {checkpoint} could not be loaded into {name} "
                           f"({type(err).__name__}: {err})")
    if isinstance(err, RuntimeError):
        return ConfigError(f"model.pretrained: {err}")
    if isinstance(err, OSError):
        return ConfigError(
            f"model.pretrained: the {pretrained!r} weights of {name!r} could not be fetched ({type(err).__name__}: "
            f"{err}). Offline, download them once and pass model.checkpoint"
        )
    return None


def load_clip(
    name: str, pretrained: str | bool | None = None, checkpoint: str | None = None, **kwargs: Any
) -> nn.Module:
    """An open_clip model (``CLIP`` or ``CustomTextCLIP``) in eval mode, frozen weights as loaded.

    Errors name the key to fix: an unknown architecture, a tag that does not exist for it, a
    checkpoint file that is missing or does not fit.
    """
    import open_clip

    if pretrained is True or pretrained is False:
        pretrained = None if pretrained is False else "openai"
    if checkpoint is not None and pretrained:
        raise ConfigError("model.checkpoint: give a local checkpoint or model.pretrained, not both")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ConfigError(f"model.checkpoint: {checkpoint} does not exist")
    if not name.startswith(("local-dir:", "hf-hub:")) and open_clip.get_model_config(name) is None:
        import difflib

        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise ConfigError(f"model.name: {name!r} is not an open_clip architecture" +
                          (f"; did you mean {close}?" if close else "; see open_clip.list_models()"))
    message = check_activation(name, pretrained, kwargs)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=2)
        logger.warning(message)
    try:
        model = open_clip.create_model(name, pretrained=checkpoint or pretrained, **kwargs)
    except Exception as err:
        translated = _load_error(err, name, pretrained, checkpoint)
        if translated is None:
            raise
        raise translated from err
    return model.eval()
