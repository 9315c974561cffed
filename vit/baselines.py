"""The baselines people compare against: linear probing and full fine-tuning.

``linear`` trains only a copy of the head. ``full`` trains every parameter; to honour
``vp.detach`` it keeps a CPU copy of the original weights, and its adapter file holds the whole
model (as a full fine-tune must).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from visionpeft.config import MethodConfig
from visionpeft.vit.base import VitMethod
from visionpeft.vit.surface import find_vit, vit_prefix


@dataclasses.dataclass
class LinearConfig(MethodConfig):
    """Linear probing has no hyper-parameters beyond the trainer's."""


@dataclasses.dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning has no hyper-parameters beyond the trainer's."""


class LinearProbe(VitMethod):
    """Train the classification head on frozen features."""

    name = "linear"
    description = "Linear probing baseline: only a copy of the ViT's head trains"
    Config = LinearConfig
    mergeable = True
    starts_as_identity = True


class FullFineTune(VitMethod):
    """Train every parameter of the ViT, with the head."""

    name = "full"
    description = "Full fine-tuning baseline: every parameter of the ViT trains (file holds the whole model)"
    Config = FullConfig
    mergeable = True
    freezes_base = False
    starts_as_identity = True
    trains_head_copy = False

    def insert(self, model: nn.Module) -> None:
        self._backup = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
        self._params = dict(model.named_parameters())
        for p in self._params.values():
            p.requires_grad_(True)

    def remove(self, model: nn.Module, merge: bool = False) -> None:
        if not merge:
            with torch.no_grad():
                for n, p in self._params.items():
                    p.copy_(self._backup[n])
        self._backup = {}
        self._params = {}

    def own_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return dict(self._params)

    def train_modules(self, model: nn.Module) -> list[nn.Module] | None:
        """Everything trains, so the whole model follows the train/eval mode."""
        return None

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        """timm's own list (``pos_embed``, ``cls_token``, ``reg_token``, ...), with the ViT's path in ``model``."""
        vit = find_vit(model)
        own = getattr(vit, "no_weight_decay", None)
        prefix = vit_prefix(model)
        return {f"{prefix}{name}" for name in own()} if callable(own) else set()
