"""The optimizer and its learning-rate schedule: parameter groups, SGD / AdamW, warmup and cosine.

Weight decay follows timm's convention: every trained tensor of two or more dimensions decays
except the ones the model (its ``no_weight_decay()``) or an attached method
(:meth:`~visionpeft.method.Method.no_weight_decay`) names; ``decay_all`` decays everything, as
Dassl's recipes do.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from visionpeft.errors import TrainingError
from visionpeft.method import attached_methods
from visionpeft.runconfig import TrainConfig


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """The qualified parameter names of ``model`` declared free of weight decay.

    The union of the model's own ``no_weight_decay()`` (timm's convention, names relative to the
    model) and every attached method's ``no_weight_decay(model)``. Names are matched exactly.
    """
    names: set[str] = set()
    declared = getattr(model, "no_weight_decay", None)
    if callable(declared):
        names |= set(declared())
    for method in attached_methods(model):
        names |= set(method.no_weight_decay(model))
    return names


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the trainable parameters with and without weight decay.

    Decay shrinks weight matrices towards zero, which regularises them. Biases and norm scales
    (every tensor with ``ndim <= 1``) and the tensors :func:`no_weight_decay_names` lists are not
    weights of that kind: shrinking them only biases the model, so they get none unless
    ``decay_all`` is set. Only parameters with ``requires_grad`` are included; empty groups are
    left out. The order is the model's, so the groups of a rebuilt model match a saved optimizer
    state.
    """
    exempt = set() if decay_all else no_weight_decay_names(model)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            decays = decay_all or (param.ndim > 1 and name not in exempt)
            (decay if decays else no_decay).append(param)
    groups = []
    for label, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
        if params:
            groups.append({"params": params, "weight_decay": wd, "group": label})
    return groups


def trainables_to_fp32(model: nn.Module) -> None:
    """Cast the trainable parameters of ``model`` held in fp16 or bf16 to fp32, in place.

    Optimizer updates in half precision lose small steps entirely; the trained tensors stay fp32
    and autocast decides the compute precision. Frozen tensors keep their dtype.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def peak_lr(train: TrainConfig, world_size: int = 1) -> float:
    """The peak learning rate: ``lr``, or with ``scale_lr`` ``lr x total batch / 256`` (VPT's rule)."""
    if not train.scale_lr:
        return train.lr
    return train.lr * train.batch_size * train.grad_accum * world_size / 256


def build_optimizer(model: nn.Module, train: TrainConfig, world_size: int = 1) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters of ``model`` (see :func:`param_groups`)."""
    groups = param_groups(model, train.weight_decay, train.decay_all)
    if not groups:
        raise TrainingError(
            "the model has no trainable parameters (none has requires_grad); attach an adapter first "
            "(vp.attach) or unfreeze the parameters to train"
        )
    lr = peak_lr(train, world_size)
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=(train.betas[0], train.betas[1]))


def warmup_length(train: TrainConfig, steps_per_epoch: int) -> int:
    """The warmup in optimizer steps: ``warmup_steps``, or ``warmup_epochs`` x steps per epoch, rounded."""
    if train.warmup_steps is not None:
        return train.warmup_steps
    if train.warmup_epochs is not None:
        return round(train.warmup_epochs * steps_per_epoch)
    return 0


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    min_ratio: float = 0.0,
    *,
    warmup_type: str = "linear",
    warmup_ratio: float = 0.0,
    cosine_length: str = "remaining",
) -> float:
    """The learning rate of step ``step`` (0-based) as a fraction of the peak.

    A warmup over ``warmup_steps`` steps, linear from 0 or constant at ``warmup_ratio``; then a
    cosine decay towards ``min_ratio`` (or the peak kept, for ``"constant"``). The cosine spans the
    steps after warmup (``"remaining"``: it ends at ``min_ratio``), or ``total_steps`` counted from
    the end of warmup (``"total"``, Dassl's scheduler behind CoOp: it stops short of the minimum).
    """
    if step < warmup_steps:
        return warmup_ratio if warmup_type == "constant" else step / warmup_steps
    if schedule == "constant":
        return 1.0
    span = total_steps if cosine_length == "total" else total_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int, steps_per_epoch: int, world_size: int = 1
) -> LambdaLR:
    """The schedule of ``train`` as a ``LambdaLR`` stepped once per optimizer step (its state checkpoints).

    With ``schedule_unit: epoch`` the rate is a function of the epoch (``step // steps_per_epoch``),
    the warmup and the length counted in epochs, as Dassl's per-epoch schedulers do.
    """
    peak = peak_lr(train, world_size)
    min_ratio = min(1.0, train.min_lr / peak)
    kwargs = {"warmup_type": train.warmup_type, "warmup_ratio": train.warmup_lr / peak,
              "cosine_length": train.cosine_length}
    if train.schedule_unit == "epoch":
        epochs = math.ceil(total_steps / steps_per_epoch)
        warmup_epochs = round(warmup_length(train, steps_per_epoch) / steps_per_epoch)

        def factor(step: int) -> float:
            return lr_factor(step // steps_per_epoch, epochs, warmup_epochs, train.scheduler, min_ratio, **kwargs)
    else:
        warmup = warmup_length(train, steps_per_epoch)

        def factor(step: int) -> float:
            return lr_factor(step, total_steps, warmup, train.scheduler, min_ratio, **kwargs)

    return LambdaLR(optimizer, factor)
