"""Small modules that methods insert into a host model.

* :class:`TrainableCopy` wraps a module (usually a classification head), keeps the original
  frozen and trains one copy per adapter, like PEFT's ``modules_to_save``.
* :class:`AddDelta` is a parametrization that adds one trained delta per adapter to a tensor
  (BitFit's biases), so the original tensor stays untouched until a merge.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class TrainableCopy(nn.Module):
    """A frozen original module and one trainable copy per adapter name.

    The forward pass runs the copy of the active adapter, or the original when none is active.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None

    def add(self, adapter_name: str) -> nn.Module:
        """Add a trainable copy of the original for ``adapter_name`` and make it active."""
        clone = copy.deepcopy(self.original)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[adapter_name] = clone
        self.active = adapter_name
        return clone

    def remove(self, adapter_name: str) -> None:
        """Drop the copy of ``adapter_name``; the most recent remaining copy becomes active."""
        del self.copies[adapter_name]
        if self.active == adapter_name:
            self.active = next(reversed(list(self.copies.keys())), None)

    def forward(self, *args, **kwargs):
        module = self.copies[self.active] if self.active is not None else self.original
        return module(*args, **kwargs)


class AddDelta(nn.Module):
    """Parametrization ``tensor + sum(active deltas)``, one zero-initialised delta per adapter.

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization`. The result keeps
    the original's dtype, so an fp32 delta can train on an fp16 model.
    """

    def __init__(self) -> None:
        super().__init__()
        self.deltas = nn.ParameterDict()
        self.active: list[str] = []

    def add(self, adapter_name: str, like: torch.Tensor) -> nn.Parameter:
        """Create the zero delta of ``adapter_name``, shaped like ``like``, and activate it."""
        delta = nn.Parameter(torch.zeros_like(like, dtype=torch.promote_types(like.dtype, torch.float32)))
        self.deltas[adapter_name] = delta
        self.active.append(adapter_name)
        return delta

    def remove(self, adapter_name: str) -> None:
        """Drop the delta of ``adapter_name``."""
        del self.deltas[adapter_name]
        self.active.remove(adapter_name)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        out = original
        for name in self.active:
            out = out + self.deltas[name]
        return out.to(original.dtype)
