"""What every visionpeft.vit method shares: the model family, the task head, train/eval modes.

Every method trains a copy of the ViT's classification head for the task (saved with the
adapter), and keeps the frozen backbone in eval mode while training, as the original
implementations do (no backbone dropout or drop-path); only the method's own modules and the head
copy follow ``train()``.

**Head recipes.** A method whose config declares ``head`` (a :data:`HeadRecipe`, help
:data:`HEAD_HELP`) builds its head copy as a paper's code does (:data:`HEAD_RECIPES`):

* ``plain``: the model's own head, as built (the default);
* ``vpt`` (KMnP/vpt ``MLP(special_bias=True)``): weight ``kaiming_normal_(mode="fan_out")``, bias
  ``-log((1 - 0.01) / 0.01) = -4.595`` (a prior probability of 0.01 per class);
* ``adaptformer`` (ShoufaChen/AdaptFormer ``main_image.py``): ``BatchNorm1d(affine=False,
  eps=1e-6)`` before the linear, weight ``trunc_normal_(std=0.01)``, bias PyTorch's ``Linear``
  default (the script never re-initialises it);
* ``st_adapter`` (linziyi96/st-adapter): ``Dropout(0.5)`` before the linear, weight
  ``normal_(std=0.02)``, bias 0.

The backbone stays in eval mode either way; the head follows the mode: in training the batch
norm normalises with the batch's statistics (and updates its running ones) and the dropout
drops, at evaluation both are in eval mode. The batch norm's running statistics are buffers of
the head copy and are saved with the adapter. The vit task's ``train.recipe`` of the same name
selects the recipe (see :data:`visionpeft.vit.task.RECIPE_HEADS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from visionpeft.errors import ConfigError, UnsupportedModelError
from visionpeft.head import attach_head, detach_head, head_modules, head_tensors, merge_head
from visionpeft.method import Method
from visionpeft.vit.surface import SUPPORTED, check_blocks, find_vit, vit_prefix

HeadRecipe = Literal["plain", "vpt", "adaptformer", "st_adapter"]
#: VPT's "special bias": the logit of a prior probability of 0.01 per class
VPT_HEAD_BIAS = -math.log((1 - 0.01) / 0.01)


#: the help text of a method config's ``head`` field: ``head: HeadRecipe = field("plain", help=HEAD_HELP)``
HEAD_HELP = ("the head's recipe: plain (the model's head), vpt (kaiming fan-out, bias -4.595), adaptformer "
             "(BatchNorm1d without affine before it, std 0.01), st_adapter (dropout 0.5 before it, std 0.02); the vit "
             "task's train.recipe of that name selects it")


class RecipeHead(nn.Module):
    """A linear head and what a paper's recipe puts before it (a batch norm, a dropout)."""

    def __init__(self, before: nn.Module, linear: nn.Linear) -> None:
        super().__init__()
        self.before = before
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and isinstance(self.before, nn.BatchNorm1d) and x.shape[0] < 2:
            raise ConfigError(
                "method.head: the adaptformer head's batch norm needs at least 2 images per training batch, got 1; "
                "set train.drop_last: true or a train.batch_size that leaves no batch of one"
            )
        return self.linear(self.before(x))

    def merged(self) -> nn.Linear:
        """The head at evaluation as one ``nn.Linear``: the batch norm's running statistics folded in."""
        linear = nn.Linear(self.linear.in_features, self.linear.out_features, bias=True,
                           device=self.linear.weight.device, dtype=self.linear.weight.dtype)
        weight = self.linear.weight.detach()
        bias = self.linear.bias.detach() if self.linear.bias is not None else torch.zeros_like(linear.bias)
        if isinstance(self.before, nn.BatchNorm1d):
            bn = self.before
            scale = torch.rsqrt(bn.running_var.double() + bn.eps)
            shift = -bn.running_mean.double() * scale
            if bn.affine:
                shift = shift * bn.weight.double() + bn.bias.double()
                scale = scale * bn.weight.double()
            bias = bias + (weight.double() @ shift).to(bias.dtype)
            weight = (weight.double() * scale).to(weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        return linear


def _vpt_head(linear: nn.Linear) -> nn.Module:
    nn.init.kaiming_normal_(linear.weight, a=0, mode="fan_out")
    nn.init.constant_(linear.bias, VPT_HEAD_BIAS)
    return linear


def _adaptformer_head(linear: nn.Linear) -> nn.Module:
    nn.init.trunc_normal_(linear.weight, std=0.01, a=-2.0, b=2.0)  # timm's trunc_normal_ bounds
    bound = 1 / math.sqrt(linear.in_features)  # nn.Linear's own bias init, which the script keeps
    nn.init.uniform_(linear.bias, -bound, bound)
    norm = nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6, device=linear.weight.device,
                          dtype=linear.weight.dtype)
    return RecipeHead(norm, linear)


def _st_adapter_head(linear: nn.Linear) -> nn.Module:
    nn.init.normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)
    return RecipeHead(nn.Dropout(0.5), linear)


#: the head recipes: each takes the head copy (an ``nn.Linear``), initialises it and returns the head
HEAD_RECIPES: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "vpt": _vpt_head,
    "adaptformer": _adaptformer_head,
    "st_adapter": _st_adapter_head,
}


def build_recipe_head(linear: nn.Module, recipe: str) -> nn.Module:
    """``linear`` (a fresh head copy) initialised and wrapped as ``recipe`` says; ``plain`` returns it as is.

    Changes ``linear``'s weights in place (from the global RNG).
    """
    if recipe == "plain":
        return linear
    if not isinstance(linear, nn.Linear) or linear.bias is None:
        raise UnsupportedModelError(f"head: {recipe!r} needs the model's head to be an nn.Linear with a bias, not "
                                    f"{type(linear).__name__}; use head: plain")
    with torch.no_grad():
        return HEAD_RECIPES[recipe](linear)


class VitMethod(Method):
    """Base class of the methods of the ``vit`` domain.

    Subclasses implement :meth:`insert`, :meth:`remove`, :meth:`own_tensors` and
    :meth:`own_modules`; the head copy, the model check and train modes are handled here.
    """

    domain = "vit"
    needs_standard_blocks = False
    #: a video method adapts a timm ViT inside a :class:`~visionpeft.vit.video.VideoClassifier`, and only there
    video = False
    trains_head_copy = True
    _head: str | None = None

    @classmethod
    def check_vit(cls, vit: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` when the method cannot adapt ``vit`` (a layer it needs is missing)."""

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        if cls.video:
            from visionpeft.vit.video import VideoClassifier

            if not isinstance(model, VideoClassifier):
                return False
        try:
            vit = find_vit(model)
            if cls.needs_standard_blocks:
                check_blocks(vit)
            cls.check_vit(vit)
        except UnsupportedModelError:
            return False
        return True

    @classmethod
    def supported_families(cls) -> list[str]:
        if cls.video:
            return ["visionpeft.vit.VideoClassifier around a timm VisionTransformer (video clips (B, T, C, H, W))"]
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
            self._apply_head_recipe(model)
        return model

    def _apply_head_recipe(self, model: nn.Module) -> None:
        recipe = getattr(self.config, "head", "plain")
        if recipe == "plain":
            return
        copies = model.get_submodule(self._head).copies
        copies[self.adapter_name] = build_recipe_head(copies[self.adapter_name], recipe)

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
            self._fold_recipe_head(model)
            merge_head(model, self._head, self.adapter_name)
        return model

    def _fold_recipe_head(self, model: nn.Module) -> None:
        # A recipe head merges as one Linear (its batch norm folded), so the merged model has the
        # base model's keys; without a copy left (a later adapter replaced the head) there is nothing to fold.
        copies = getattr(model.get_submodule(self._head), "copies", {})
        if self.adapter_name in copies and isinstance(copies[self.adapter_name], RecipeHead):
            copies[self.adapter_name] = copies[self.adapter_name].merged()

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tensors = self.own_tensors(model)
        if self._head is not None:
            tensors.update(head_tensors(model, self._head, self.adapter_name))
        return tensors

    def train_modules(self, model: nn.Module) -> list[nn.Module] | None:
        return self.own_modules(model) + head_modules(model, self._head)
