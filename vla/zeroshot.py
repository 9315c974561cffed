"""The zero-shot CLIP baseline: a classifier built from hand-written prompt templates.

Each class's weight is the normalised mean of the normalised text features of its templates
(open_clip's ``build_zero_shot_classifier`` rule; one template gives its feature itself). The
templates: a list of ``"... {} ..."`` strings, or a named set — the data set's template of CoOp's
``zsclip.py`` (``custom``), open_clip's 7 ``simple`` ImageNet templates, its 80 ``openai``
templates, or CoOp's ``ZeroshotCLIP2`` ensemble (the 7 plus the data set's own). Nothing trains;
the classifier is recomputed from the frozen model whenever the class list changes, so a saved
"adapter" is just its config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from visionpeft.config import MethodConfig, field
from visionpeft.errors import ConfigError
from visionpeft.vla.prompts import (
    PromptedCLIP,
    PromptLearner,
    PromptMethod,
    check_distinct_prompts,
    prompt_classname,
)
from visionpeft.vla.text import encode_embeddings, get_tokenizer

TEXT_BATCH = 1024  # prompts per text-tower call when building the classifier


@dataclasses.dataclass
class ZeroShotConfig(MethodConfig):
    """Which templates make the classifier; the default is CLIP's single "a photo of a {}."."""

    method = "zeroshot"
    classnames: list[str] = field([], help="the class names to classify (filled from the data set by the task)")
    templates: list[str] = field(["a photo of a {}."], help="prompt templates with {} for the class name")
    template_set: Literal["custom", "simple", "openai", "ensemble"] | None = field(
        None, help="a named template set instead of templates (custom and ensemble need dataset)"
    )
    dataset: str | None = field(None, help="the CoOp data-set name whose template the custom set uses")
    tokenizer: str | None = field(None, help="open_clip model name whose tokenizer to use (default: OpenAI BPE)")

    def check(self) -> None:
        if self.template_set is None:
            bad = [t for t in self.templates if t.count("{}") != 1]
            if not self.templates or bad:
                raise ConfigError(
                    f"zeroshot.templates: every template needs exactly one '{{}}' for the class name, got {bad or '[]'}"
                )


def resolve_templates(config: ZeroShotConfig) -> list[str]:
    """The template strings of ``config`` (named sets come from :mod:`visionpeft.vla.templates`)."""
    if config.template_set is None:
        return list(config.templates)
    from visionpeft.vla import templates

    if config.template_set in ("custom", "ensemble") and config.dataset is None:
        # Checked here, not in the config: the vla task fills the data set in from the run's data.
        raise ConfigError(f"zeroshot.dataset: template_set {config.template_set!r} needs the data set's name")
    if config.template_set == "custom":
        return [templates.template_for(config.dataset)]
    if config.template_set == "simple":
        return templates.simple_templates()
    if config.template_set == "openai":
        return templates.openai_templates()
    return templates.ensemble_templates(config.dataset)


class ZeroShotClassifier(PromptLearner):
    """The frozen class weights of the zero-shot classifier (a buffer, rebuilt per class list)."""

    class_weights: torch.Tensor | None

    def __init__(self, clip: nn.Module, config: ZeroShotConfig) -> None:
        nn.Module.__init__(self)
        from visionpeft.vla.text import text_tower

        tower = text_tower(clip)
        self.__dict__["_clip"] = clip
        self.__dict__["_tower"] = tower  # not a submodule, as PromptLearner's
        self.tokenizer = get_tokenizer(config.tokenizer, tower.context_length)
        self.templates = resolve_templates(config)
        self.classnames: list[str] = []

    def set_classnames(self, classnames: Sequence[str]) -> None:
        check_distinct_prompts(self.tokenizer([self.templates[0].format(prompt_classname(n)) for n in classnames]),
                               classnames)
        self.classnames = list(classnames)
        # Built on first use, when the model is frozen as it will be used.
        self.register_buffer("class_weights", None, persistent=False)

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``encode_text(tokens)`` in fp32, run only up to the batch's last end token (:func:`encode_embeddings`)."""
        return encode_embeddings(self.tower, self.tower.embed(tokens), tokens).float()

    def weights(self) -> torch.Tensor:
        """The normalised class weights ``(C, E)``: the normalised mean of each class's template features."""
        if self.class_weights is None:
            clip = self.__dict__["_clip"]
            device = clip.logit_scale.device
            texts = [t.format(prompt_classname(n)) for n in self.classnames for t in self.templates]
            # Outside any autocast: the classifier is kept, so it is built at the model's precision.
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                # Every (class, template) prompt in batched calls, not one call per class.
                features = torch.cat([self._encode(self.tokenizer(texts[i : i + TEXT_BATCH]).to(device))
                                      for i in range(0, len(texts), TEXT_BATCH)])
            features = F.normalize(features, dim=-1).reshape(len(self.classnames), len(self.templates), -1)
            # One template: its feature itself (normalising twice would move the last bits).
            self.class_weights = features[:, 0] if features.shape[1] == 1 else F.normalize(features.mean(1), dim=-1)
        return self.class_weights


class ZeroShotCLIP(PromptedCLIP):
    """CLIP classifying with template features."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_images(images), self.prompt_learner.weights())


class ZeroShot(PromptMethod):
    """Zero-shot CLIP with hand-written templates (the baseline of every prompt-learning paper)."""

    name = "zeroshot"
    description = "zero-shot CLIP baseline from prompt templates (CoOp's per-data-set ones, open_clip ensembles)"
    Config = ZeroShotConfig
    Wrapper = ZeroShotCLIP
    trains = False

    def build_learner(self, clip: nn.Module) -> PromptLearner:
        return ZeroShotClassifier(clip, self.config)
