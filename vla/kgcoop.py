"""KgCoOp: knowledge-guided context optimisation (Yao et al., CVPR 2023; htyao89/KgCoOp
``KgCoOp/trainers/kgcoop.py``).

CoOp's learned context (here 4 vectors initialised from "a photo of a", as the original hard-codes)
plus a term that keeps the learned class text features near the hand-crafted ones of frozen CLIP:

    loss = CE + kg_weight * (1 - mean over classes of cos(t_learned, t_handcrafted))

with ``kg_weight`` 8.0 (the README's example). This is the original code's form
(``score = cos(text_features, text_features_old); score = 1.0 - torch.mean(score)``); for unit
vectors it is half the paper's mean squared distance ``mean ||t_learned - t_handcrafted||^2``.
The hand-crafted features are the zero-shot classifier of the data set's template (CoOp's
``CUSTOM_TEMPLATES``, except DTD: ``a photo of a {}, a type of texture.``, as KgCoOp's table),
computed once per class list by the frozen model.

The term reaches the trainer through :meth:`~visionpeft.method.Method.loss_term`: each training
forward keeps its learned class features, and the hook compares them with the hand-crafted ones
(no second text-tower pass).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visionpeft.config import field
from visionpeft.errors import ConfigError
from visionpeft.vla.coop import CoOp, CoOpCLIP, CoOpConfig
from visionpeft.vla.prompts import PromptedCLIP, PromptLearner
from visionpeft.vla.zeroshot import ZeroShotClassifier, ZeroShotConfig

DTD_TEMPLATE = "a photo of a {}, a type of texture."


def kgcoop_template(dataset: str | None) -> str:
    """KgCoOp's hand-crafted template of ``dataset``: CoOp's, but DTD's names the texture as a type."""
    from visionpeft.vla import templates

    template = templates.template_for(dataset)
    if dataset is not None and templates._template_key(dataset) == "DescribableTextures":
        return DTD_TEMPLATE
    return template


def knowledge_term(learned: torch.Tensor, handcrafted: torch.Tensor) -> torch.Tensor:
    """``1 - mean_c cos(learned_c, handcrafted_c)`` over the rows of two ``(C, E)`` feature sets, as the original."""
    return 1.0 - F.cosine_similarity(learned.float(), handcrafted.float(), dim=1, eps=1e-7).mean()


@dataclasses.dataclass
class KgCoOpConfig(CoOpConfig):
    """KgCoOp's hyper-parameters: CoOp's fields with the original's defaults, and the weight of the term."""

    method = "kgcoop"
    n_ctx: int = field(4, help="number of learned context vectors (ignored with ctx_init: its token count)", ge=1)
    ctx_init: str | None = field("a photo of a", help="initialise the context from these words (the original's)")
    kg_weight: float = field(8.0, help="weight of 1 - mean cos(learned, hand-crafted class text features)", ge=0)
    template: str | None = field(None, help="hand-crafted template with {} (default: the data set's, as KgCoOp)")
    dataset: str | None = field(None, help="the CoOp data-set name whose template gives the hand-crafted features")

    def check(self) -> None:
        super().check()
        if self.template is not None and self.template.count("{}") != 1:
            raise ConfigError(f"kgcoop.template: {self.template!r} needs exactly one '{{}}' for the class name")

    def handcrafted_template(self) -> str:
        return self.template if self.template is not None else kgcoop_template(self.dataset)


class KgCoOpCLIP(CoOpCLIP):
    """CoOp's model with the frozen hand-crafted classifier beside it and the last training forward's features."""

    def __init__(self, clip: nn.Module, prompt_learner: PromptLearner, handcrafted: ZeroShotClassifier) -> None:
        super().__init__(clip, prompt_learner)
        self.handcrafted = handcrafted
        self._learned_features: torch.Tensor | None = None

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.handcrafted.set_classnames(self.prompt_learner.classnames)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        text = self.text_features()
        # Kept only when a gradient is taken (training): the loss term reads them.
        self._learned_features = text if torch.is_grad_enabled() else None
        return self.logits(self.encode_images(images), text)

    def handcrafted_features(self) -> torch.Tensor:
        """The frozen hand-crafted class features ``(C, E)``, normalised (built once per class list)."""
        return self.handcrafted.weights()

    def knowledge_term(self, learned: torch.Tensor | None = None) -> torch.Tensor:
        """The unweighted term for ``learned`` class features (default: the current context's)."""
        if learned is None:
            learned = self.text_features()
        return knowledge_term(learned, self.handcrafted_features())

    def __deepcopy__(self, memo: dict) -> KgCoOpCLIP:
        # The kept features belong to an autograd graph, which cannot be copied: the copy gets none.
        result = type(self).__new__(type(self))
        memo[id(self)] = result
        for key, value in self.__dict__.items():
            result.__dict__[key] = None if key == "_learned_features" else copy.deepcopy(value, memo)
        return result


class KgCoOp(CoOp):
    """KgCoOp: CoOp's context, kept near the hand-crafted prompts' text features by an extra loss term."""

    name = "kgcoop"
    description = "KgCoOp: CoOp context plus a term keeping class text features near hand-crafted ones"
    Config = KgCoOpConfig
    Wrapper = KgCoOpCLIP

    def wrap(self, clip: nn.Module, learner: PromptLearner) -> PromptedCLIP:
        config = self.config
        handcrafted = ZeroShotClassifier(clip, ZeroShotConfig(
            classnames=list(config.classnames), templates=[config.handcrafted_template()], tokenizer=config.tokenizer
        ))
        handcrafted.set_classnames(learner.classnames)
        return self.Wrapper(clip, learner, handcrafted)

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """``kg_weight`` times the term for the class features of the forward that just ran (``None`` without one)."""
        learned, model._learned_features = model._learned_features, None
        if learned is None or self.config.kg_weight == 0:
            return None
        return self.config.kg_weight * model.knowledge_term(learned)
