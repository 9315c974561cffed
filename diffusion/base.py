"""What every visionpeft.diffusion method shares: the model family it adapts."""

from __future__ import annotations

from torch import nn

from visionpeft.diffusion.hosts import STABLE_DIFFUSION, is_stable_diffusion
from visionpeft.method import Method


class DiffusionMethod(Method):
    """Base class of the methods of the ``diffusion`` domain: they adapt a ``StableDiffusionModel``."""

    domain = "diffusion"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return is_stable_diffusion(model)

    @classmethod
    def supported_families(cls) -> list[str]:
        return [f"{STABLE_DIFFUSION.family} (visionpeft.diffusion.models.StableDiffusionModel)"]
