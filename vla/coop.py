"""CoOp: context optimisation for CLIP (Zhou et al., IJCV 2022; KaiyangZhou/CoOp ``trainers/coop.py``).

The prompt of class ``c`` is ``[SOS, v_1 .. v_M, tokens of c, ".", EOS]``: ``M`` learned context
vectors in the token-embedding space, shared by every class (or one set per class with ``csc``),
and the class name where ``class_token_position`` puts it (``end``, ``middle``, ``front``). The
text tower runs on the assembled embeddings; logits are ``logit_scale.exp()`` times the cosine of
image and class features. Only the context trains.

Initialisation as the original: from ``ctx_init`` (the embeddings of its tokens; ``n_ctx``
follows its length) or N(0, 0.02). With ``ctx_init="a photo of a"`` the logits are exactly
those of the ``zeroshot`` method with the prompt "a photo of a {class}." (both cut the text
tower at the end token; against ``encode_text``'s 77 positions they agree to about 1e-6). Where
CoOp counts the words of ``ctx_init``, this counts its BPE tokens: the same for "a photo of a",
and right for words that split into several tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from visionpeft.config import MethodConfig, field
from visionpeft.errors import ConfigError
from visionpeft.vla.prompts import PromptedCLIP, PromptLearner, PromptMethod, context_length_of, init_context
from visionpeft.vla.text import encode_embeddings


@dataclasses.dataclass
class CoOpConfig(MethodConfig):
    """CoOp's hyper-parameters; defaults of the paper's main setting (16 random contexts, class at the end)."""

    method = "coop"
    classnames: list[str] = field([], help="the class names to classify (filled from the data set by the task)")
    n_ctx: int = field(16, help="number of learned context vectors (ignored with ctx_init: its token count)", ge=1)
    ctx_init: str | None = field(None, help="initialise the context from these words, e.g. 'a photo of a'")
    csc: bool = field(False, help="class-specific contexts: one set of n_ctx vectors per class")
    class_token_position: Literal["end", "middle", "front"] = field("end", help="where the class name goes")
    init_std: float = field(0.02, help="std of the random context init", gt=0)
    tokenizer: str | None = field(None, help="open_clip model name whose tokenizer to use (default: OpenAI BPE)")

    def check(self) -> None:
        if self.csc and self.ctx_init is not None:
            raise ConfigError(
                "coop.csc: class-specific contexts start from random vectors in CoOp (ctx_init makes one shared "
                "context); set ctx_init: null or csc: false"
            )


class CoOpPromptLearner(PromptLearner):
    """CoOp's context vectors and the assembly of the class prompts."""

    def __init__(self, clip: nn.Module, config: CoOpConfig) -> None:
        super().__init__(clip, config.tokenizer)
        n_ctx = config.n_ctx
        if config.ctx_init is not None:
            n_ctx = context_length_of(self.tokenizer, config.ctx_init, "coop")
        shape = (len(config.classnames), n_ctx, self.tower.width) if config.csc else (n_ctx, self.tower.width)
        ctx, self.prefix_text = init_context(self.tower, self.tokenizer, config.ctx_init, n_ctx, shape, config.init_std)
        self.ctx = nn.Parameter(ctx)
        self.n_prompt = n_ctx
        self.csc = config.csc
        self.position = config.class_token_position

    def set_classnames(self, classnames) -> None:
        if self.csc and len(classnames) != self.ctx.shape[0]:
            raise ConfigError(
                f"coop.classnames: class-specific contexts were learned for {self.ctx.shape[0]} classes, not "
                f"{len(classnames)}; a CSC context only fits its own class list"
            )
        super().set_classnames(classnames)
        self.register_buffer("order", self._order(), persistent=False)

    def _order(self) -> torch.Tensor | None:
        """Per class, the sequence positions of the ``end`` layout to read for this layout (``None`` for ``end``)."""
        if self.position == "end":
            return None
        n, length = self.n_prompt, self.tokenized_prompts.shape[1]
        rows = []
        for name_len in self.name_lens:
            ctx = list(range(1, 1 + n))
            name = list(range(1 + n, 1 + n + name_len))
            rest = list(range(1 + n + name_len, length))
            if self.position == "front":
                rows.append([0, *name, *ctx, *rest])
            else:  # middle: half the context, the class name, the other half
                half = n // 2
                rows.append([0, *ctx[:half], *name, *ctx[half:], *rest])
        return torch.tensor(rows, device=self.tokenized_prompts.device)

    def forward(self) -> torch.Tensor:
        """The prompt embeddings of every class, ``(C, L, D)``."""
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        prefix, suffix = self.token_prefix, self.token_suffix
        prompts = torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1)
        if self.order is not None:
            index = self.order.unsqueeze(-1).expand(-1, -1, prompts.shape[-1])
            prompts = torch.gather(prompts, 1, index)
        return prompts


class CoOpCLIP(PromptedCLIP):
    """CLIP with CoOp prompts: one text-tower pass over the class prompts per forward."""

    def text_features(self) -> torch.Tensor:
        """L2-normalised features of every class prompt, ``(C, E)`` (computed once per evaluation)."""
        learner = self.prompt_learner

        def compute() -> torch.Tensor:
            features = encode_embeddings(learner.tower, learner(), learner.tokenized_prompts)
            return nn.functional.normalize(features.float(), dim=-1)

        return self.cached_without_grad(compute)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_images(images), self.text_features())


class CoOp(PromptMethod):
    """CoOp: learned context vectors in front of the class name (the text tower is frozen)."""

    name = "coop"
    description = "CoOp learned prompt context for CLIP (shared or class-specific, class at end/middle/front)"
    Config = CoOpConfig
    Wrapper = CoOpCLIP

    def build_learner(self, clip: nn.Module) -> PromptLearner:
        return CoOpPromptLearner(clip, self.config)

    @classmethod
    def check_run(cls, config: MethodConfig, run: Any) -> None:
        """Class-specific contexts belong to their classes, so they cannot be moved to novel ones."""
        if config.csc and getattr(run.data, "setting", None) == "base2novel":
            raise ConfigError("method.csc: class-specific contexts cannot classify novel classes; use csc: false for "
                              "data.setting: base2novel")
