"""CLIP-Adapter: a residual bottleneck MLP on CLIP's image features (Gao et al., IJCV 2023;
gaopengcuhk/CLIP-Adapter ``clip_adapter.py``).

The adapter is ``Linear(D, D // reduction, bias=False) -> ReLU -> Linear(D // reduction, D,
bias=False) -> ReLU`` on the frozen image tower's features ``f`` (``D`` their width: 1024 on RN50,
the only model the original supports); the adapted feature ``ratio * A(f) + (1 - ratio) * f``
(``ratio`` 0.2) is L2-normalised and compared with the frozen text features of hand-crafted
templates: the ``zeroshot`` method's classifier, by default the data set's template of CoOp's
``CUSTOM_TEMPLATES`` (``a photo of a {}.`` without a data set). Only the adapter trains
(2·D·D/reduction parameters: 524,288 on RN50). With ``ratio: 0`` the logits are the zero-shot
ones exactly. The text side is the classifier, so a new class list (base to novel) only
rebuilds it.

The adapter's weights start from PyTorch's default ``nn.Linear`` init, as the original; they
are kept in fp32 (the original casts them to CLIP's fp16).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from visionpeft.config import MethodConfig, field
from visionpeft.errors import ConfigError, UnsupportedModelError
from visionpeft.vla.prompts import PromptedCLIP, PromptLearner, PromptMethod, _input_dtype
from visionpeft.vla.zeroshot import ZeroShotClassifier, ZeroShotCLIP, ZeroShotConfig


@dataclasses.dataclass
class CLIPAdapterConfig(MethodConfig):
    """CLIP-Adapter's hyper-parameters; defaults of the original code (ratio 0.2, reduction 4, custom template)."""

    method = "clip_adapter"
    classnames: list[str] = field([], help="the class names to classify (filled from the data set by the task)")
    ratio: float = field(0.2, help="residual ratio: ratio * adapter(f) + (1 - ratio) * f", ge=0, le=1)
    reduction: int = field(4, help="the bottleneck is the feature width divided by this", ge=1)
    templates: list[str] = field(["a photo of a {}."], help="prompt templates with {} (with template_set: null)")
    template_set: Literal["custom", "simple", "openai", "ensemble"] | None = field(
        "custom", help="a named template set for the text classifier (custom: the data set's template, or "
        "'a photo of a {}.' without one, as the original)"
    )
    dataset: str | None = field(None, help="the CoOp data-set name whose template the custom set uses")
    tokenizer: str | None = field(None, help="open_clip model name whose tokenizer to use (default: OpenAI BPE)")

    def check(self) -> None:
        if self.template_set is None:
            bad = [t for t in self.templates if t.count("{}") != 1]
            if not self.templates or bad:
                raise ConfigError(
                    f"clip_adapter.templates: every template needs exactly one '{{}}' for the class name, got "
                    f"{bad or '[]'}"
                )

    def zeroshot_config(self) -> ZeroShotConfig:
        """The config of the zero-shot classifier that gives the text features."""
        templates, template_set = list(self.templates), self.template_set
        if template_set == "custom":
            # The data set's template; without a data set CoOp's default "a photo of a {}." (not an error).
            from visionpeft.vla.templates import template_for

            templates, template_set = [template_for(self.dataset)], None
        return ZeroShotConfig(classnames=list(self.classnames), templates=templates, template_set=template_set,
                              dataset=self.dataset, tokenizer=self.tokenizer)


class Adapter(nn.Module):
    """The original's ``Adapter``: two bias-free linear layers, each followed by ReLU."""

    def __init__(self, width: int, reduction: int) -> None:
        super().__init__()
        hidden = width // reduction
        if hidden < 1:
            raise ConfigError(f"clip_adapter.reduction: {reduction} leaves no hidden unit of the {width} features; "
                              f"use at most {width}")
        self.fc = nn.Sequential(
            nn.Linear(width, hidden, bias=False), nn.ReLU(inplace=True),
            nn.Linear(hidden, width, bias=False), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def image_feature_width(clip: nn.Module) -> int:
    """The width of ``clip.visual``'s output features (the joint embedding width)."""
    width = getattr(clip.visual, "output_dim", None)
    if isinstance(width, int):
        return width
    projection = getattr(clip, "text_projection", None)
    if isinstance(projection, torch.Tensor) and projection.dim() == 2:
        return projection.shape[1]
    proj = getattr(getattr(clip, "text", None), "text_projection", None)
    if isinstance(proj, nn.Linear):
        return proj.out_features
    raise UnsupportedModelError("clip_adapter: cannot tell the width of this model's image features")


class CLIPAdapterCLIP(ZeroShotCLIP):
    """CLIP with an adapter on the image features and the zero-shot classifier on the text side."""

    def __init__(self, clip: nn.Module, classifier: PromptLearner, adapter: Adapter, ratio: float) -> None:
        super().__init__(clip, classifier)
        self.adapter = adapter
        self.ratio = ratio

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised adapted image features ``ratio * A(f) + (1 - ratio) * f`` (``f`` the frozen tower's)."""
        visual = self.clip.visual
        features = visual(images.to(_input_dtype(visual))).float()
        adapted = self.adapter(features).float()
        return F.normalize(self.ratio * adapted + (1 - self.ratio) * features, dim=-1)


class CLIPAdapter(PromptMethod):
    """CLIP-Adapter: a residual bottleneck MLP on the image features; text features from templates, frozen."""

    name = "clip_adapter"
    description = "CLIP-Adapter: residual bottleneck MLP on CLIP image features, frozen template text classifier"
    Config = CLIPAdapterConfig
    Wrapper = CLIPAdapterCLIP

    def build_learner(self, clip: nn.Module) -> PromptLearner:
        return ZeroShotClassifier(clip, self.config.zeroshot_config())

    def wrap(self, clip: nn.Module, learner: PromptLearner) -> PromptedCLIP:
        weight = clip.logit_scale
        adapter = Adapter(image_feature_width(clip), self.config.reduction).to(weight.device)
        return self.Wrapper(clip, learner, adapter, self.config.ratio)

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"adapter.{n}": p for n, p in model.adapter.named_parameters()}

    def train_modules(self, model: nn.Module) -> list[nn.Module] | None:
        return [model.adapter]
