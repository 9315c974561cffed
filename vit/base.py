"""What every visionpeft.vit method shares: the model family, the task head, train/eval modes.

Every method trains a copy of the ViT's classification head for the task (saved with the
adapter), and keeps the frozen backbone in eval mode while training, as the original
implementations do (no backbone dropout or drop-path); only the method's own modules train.
"""

from __future__ import annotations

import torch
from torch import nn

from visionpeft.errors import UnsupportedModelError
from visionpeft.head import attach_head, detach_head, head_modules, head_tensors, merge_head
from visionpeft.method import Method
from visionpeft.vit.surface import SUPPORTED, check_blocks, find_vit, vit_prefix


class VitMethod(Method):
    """Base class of the methods of the ``vit`` domain.

    Subclasses implement :meth:`insert`, :meth:`remove`, :meth:`own_tensors` and
    :meth:`own_modules`; the head copy, the model check and train modes are handled here.
    """

    domain = "vit"
    needs_standard_blocks = False
    trains_head_copy = True
    _head: str | None = None

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        try:
            vit = find_vit(model)
            if cls.needs_standard_blocks:
                check_blocks(vit)
        except UnsupportedModelError:
            return False
        return True

    @classmethod
    def supported_families(cls) -> list[str]:
        return [SUPPORTED]

    def insert(self, model: nn.Module) -> None:
        """Insert the method's modules and parameters (new parameters require grad)."""

    def remove(self, model: nn.Module, merge: bool = False) -> None:
        """Undo :meth:`insert`; with ``merge``, fold what can be folded into the base first."""

    def own_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The method's trained tensors, without the head."""
        return {}

    def own_modules(self, model: nn.Module) -> list[nn.Module]:
        """The method's modules that follow the train/eval mode (dropout inside them)."""
        return []

    def attach(self, model: nn.Module) -> nn.Module:
        self.insert(model)
        if self.trains_head_copy:
            self._head = vit_prefix(model) + "head"
            attach_head(model, self._head, self.adapter_name)
        return model

    def detach(self, model: nn.Module) -> nn.Module:
        self.remove(model)
        if self._head is not None:
            detach_head(model, self._head, self.adapter_name)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            return super().merge(model)
        self.remove(model, merge=True)
        if self._head is not None:
            merge_head(model, self._head, self.adapter_name)
        return model

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tensors = self.own_tensors(model)
        if self._head is not None:
            tensors.update(head_tensors(model, self._head, self.adapter_name))
        return tensors

    def train_modules(self, model: nn.Module) -> list[nn.Module] | None:
        return self.own_modules(model) + head_modules(model, self._head)
