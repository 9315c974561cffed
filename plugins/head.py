"""The task head that methods train beside their adapter.

A host names its classification head; a method wraps it in a
:class:`~visionpeft.modules.TrainableCopy`, so the original head stays untouched and each adapter
trains (and saves) its own copy. Every method that trains a head uses these four functions.
"""

from __future__ import annotations

import torch
from torch import nn

from visionpeft.inject import replace_module
from visionpeft.modules import TrainableCopy


def attach_head(model: nn.Module, head: str, adapter_name: str) -> None:
    """Give ``adapter_name`` a trainable copy of the module at ``head``."""
    module = model.get_submodule(head)
    if not isinstance(module, TrainableCopy):
        module = TrainableCopy(module)
        replace_module(model, head, module)
    module.add(adapter_name)


def detach_head(model: nn.Module, head: str, adapter_name: str) -> None:
    """Drop the copy of ``adapter_name``; unwrap the head when no copy is left."""
    wrapper = model.get_submodule(head)
    wrapper.remove(adapter_name)
    if not wrapper.copies:
        replace_module(model, head, wrapper.original)


def merge_head(model: nn.Module, head: str, adapter_name: str) -> None:
    """Make the adapter's trained copy the model's head when it is the active one."""
    wrapper = model.get_submodule(head)
    if not isinstance(wrapper, TrainableCopy) or adapter_name not in wrapper.copies:
        return  # an adapter merged after this one already replaced the head
    if wrapper.active == adapter_name:
        replace_module(model, head, wrapper.copies[adapter_name])
    else:
        detach_head(model, head, adapter_name)


def head_modules(model: nn.Module, head: str | None) -> list[nn.Module]:
    """The head's wrapper as a one-item list (for ``Method.train_modules``), or ``[]`` without a head."""
    return [model.get_submodule(head)] if head is not None else []


def head_tensors(model: nn.Module, head: str, adapter_name: str) -> dict[str, torch.Tensor]:
    """The copy's parameters and persistent buffers keyed as the head's own (``head.weight``, ``head.bias``).

    Buffers are the copy's state too (a batch norm's running statistics), so they are saved and
    loaded with the adapter; a head of parameters alone gives exactly its parameters.
    """
    copy = model.get_submodule(head).copies[adapter_name]
    return {f"{head}.{n}": t for n, t in copy.state_dict(keep_vars=True).items()}
