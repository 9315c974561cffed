"""Three methods a third-party package could ship, one per domain, for tests/test_method_contract.py.

The test declares them in a package's ``entry_points.txt`` (the path every plugin takes) and trains
each through its domain's task. They are deliberately small but real: each trains tensors of its
own, undoes itself on detach, and uses the method contract's hooks (``no_weight_decay``,
``export``, a config field the task fills, the diffusion container's UNet-input hook).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visionpeft.config import MethodConfig, field
from visionpeft.method import Method, RunInfo


def _write_export(method: Method, output_dir: str | os.PathLike, run: RunInfo) -> None:
    record = {"method": method.name, "step": run.step, "task": run.config.task if run.config else None}
    Path(output_dir, f"{method.name}.json").write_text(json.dumps(record))


@dataclasses.dataclass
class ShiftConfig(MethodConfig):
    """A learned shift of a ViT's logits."""

    init: float = field(0.0, help="the shift's initial value")


class LogitShift(Method):
    """vit: one learned (1, classes) shift added to the head's output; the backbone and head stay frozen."""

    name = "throwaway_logit_shift"
    domain = "vit"
    description = "test method: a learned shift of the logits"
    Config = ShiftConfig
    starts_as_identity = True

    def attach(self, model: nn.Module) -> nn.Module:
        model.throwaway_shift = nn.Parameter(torch.full((1, model.num_classes), self.config.init))
        self._hook = model.register_forward_hook(lambda module, args, out: out + module.throwaway_shift)
        return model

    def detach(self, model: nn.Module) -> nn.Module:
        self._hook.remove()
        del model.throwaway_shift
        return model

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"shift": model.throwaway_shift}

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        return {"throwaway_shift"}

    def export(self, model: nn.Module, output_dir: str | os.PathLike, run: RunInfo) -> None:
        _write_export(self, output_dir, run)


@dataclasses.dataclass
class ProbeConfig(MethodConfig):
    """A linear probe of CLIP image features, one learned vector per class."""

    classnames: list[str] = field([], help="filled from the data set by the vla task")


class ClassProbe(nn.Module):
    """Images to logits: frozen CLIP image features against learned class vectors."""

    def __init__(self, clip: nn.Module, classnames: list[str]) -> None:
        super().__init__()
        self.clip = clip
        self.classnames = list(classnames)
        width = clip.visual.output_dim
        self.weight = nn.Parameter(torch.zeros(len(classnames), width))

    def set_classnames(self, classnames: list[str]) -> None:
        if len(classnames) != self.weight.shape[0]:
            raise ValueError("a probe only classifies the classes it was trained on")
        self.classnames = list(classnames)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images), dim=-1) @ self.weight.t()


class CLIPProbe(Method):
    """vla: takes the task's class names through its config field ``classnames``."""

    name = "throwaway_clip_probe"
    domain = "vla"
    description = "test method: a linear probe of CLIP image features"
    Config = ProbeConfig

    def attach(self, model: nn.Module) -> nn.Module:
        return ClassProbe(model, self.config.classnames)

    def detach(self, model: nn.Module) -> nn.Module:
        return model.clip

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": model.weight}

    def export(self, model: nn.Module, output_dir: str | os.PathLike, run: RunInfo) -> None:
        _write_export(self, output_dir, run)


@dataclasses.dataclass
class ControlConfig(MethodConfig):
    """A zero-initialised control: pooled condition images projected onto each UNet residual slot."""

    in_channels: int = field(3, ge=1)


class PooledControl(Method):
    """diffusion: takes condition images and feeds the UNet through the container's UNet-input hook."""

    name = "throwaway_pooled_control"
    domain = "diffusion"
    description = "test method: pooled condition images as the UNet's intra-block residuals"
    Config = ControlConfig
    starts_as_identity = True
    takes_conditions = True

    def attach(self, model: nn.Module) -> nn.Module:
        from visionpeft.diffusion.t2i_adapter import unet_residual_slots

        slots = unet_residual_slots(model.unet, model.vae_scale_factor)[: len(model.unet.down_blocks)]
        self.factors = [factor for _, factor in slots]
        projections = nn.ModuleList(nn.Conv2d(self.config.in_channels, c, 1) for c, _ in slots)
        for conv in projections:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        model.add_module("throwaway_control", projections)
        self._projections = projections
        self._handle = model.register_unet_inputs(self._residuals)
        return model

    def _residuals(self, call) -> dict:
        pooled = [F.avg_pool2d(call.condition, f) for f in self.factors]
        features = [p(x).to(call.dtype) for p, x in zip(self._projections, pooled, strict=True)]
        return {"down_intrablock_additional_residuals": features}

    def detach(self, model: nn.Module) -> nn.Module:
        self._handle.remove()
        del model._modules["throwaway_control"]
        return model

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return dict(model._modules["throwaway_control"].named_parameters())

    def condition_channels(self, model: nn.Module) -> int:
        return self.config.in_channels

    def train_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model._modules["throwaway_control"]]

    def export(self, model: nn.Module, output_dir: str | os.PathLike, run: RunInfo) -> None:
        _write_export(self, output_dir, run)


@dataclasses.dataclass
class GainConfig(MethodConfig):
    """A gain (its own config: a Config records the one method it belongs to)."""

    gain: float = field(1.0)


class AudioGain(Method):
    """A method of a domain visionpeft does not ship: the registry takes its domain from the method."""

    name = "throwaway_audio_gain"
    domain = "audio"
    description = "test method of a third-party domain"
    Config = GainConfig

    def attach(self, model: nn.Module) -> nn.Module:
        return model

    def detach(self, model: nn.Module) -> nn.Module:
        return model

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {}
