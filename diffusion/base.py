"""What every visionpeft.diffusion method shares: the model family it adapts, and whether it takes conditions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import nn

from visionpeft.diffusion.hosts import STABLE_DIFFUSION, is_stable_diffusion
from visionpeft.method import Method


class DiffusionMethod(Method):
    """Base class of the methods of the ``diffusion`` domain: they adapt a ``StableDiffusionModel``."""

    domain = "diffusion"
    #: whether the method trains and samples on condition images (edges, sketches, depth) beside the
    #: captions; the diffusion task then requires them in the data (``data.condition_root`` or
    #: ``data.condition``) and refuses them for every other method
    takes_conditions: ClassVar[bool] = False

    def condition_channels(self, model: nn.Module) -> int | None:
        """The channels of the condition images this adapter takes (``None`` when it takes none)."""
        return None

    def check_prompts(self, model: nn.Module, prompts: Sequence[str], source: str,
                      class_prompts: Sequence[str] = ()) -> None:
        """Refuse, before training, prompts this adapter cannot learn from; the default accepts any.

        The diffusion task calls it on the attached model with the training images' ``prompts`` (captions
        or the instance prompt, before caption dropout), ``source`` saying where they come from in the run
        config's terms, and prior preservation's ``class_prompts``.
        """

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return is_stable_diffusion(model)

    @classmethod
    def supported_families(cls) -> list[str]:
        return [f"{STABLE_DIFFUSION.family} (visionpeft.diffusion.models.StableDiffusionModel)"]
