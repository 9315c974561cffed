"""What the CLIP prompt learners share: class prompts, the model wrapper and the method plumbing.

A prompt learner keeps the embeddings of the fixed parts of its prompts as buffers: the start
token (``token_prefix``) and everything after the context (``token_suffix``: the class name's
tokens, ".", the end token, padding). They depend on the class list only, so they are rebuilt by
:meth:`PromptLearner.set_classnames` and never saved: a context trained on some classes loads for
any other class list, as in the original code (which deletes them from its checkpoints).

:class:`PromptedCLIP` is the module that ``vp.attach`` returns: it holds the untouched CLIP model
and the prompt learner, and maps images to class logits, ``logit_scale.exp()`` times the cosine
similarity of image and class features.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from visionpeft.errors import ConfigError, UnsupportedModelError
from visionpeft.method import Method, RunInfo
from visionpeft.vla.data import duplicates_problem, prompt_classname
from visionpeft.vla.text import TextTower, count_tokens, get_tokenizer, text_tower

logger = logging.getLogger("visionpeft")

SUPPORTED = "open_clip.CLIP / open_clip.CustomTextCLIP (open_clip's own text transformer)"


def check_classnames(classnames: Sequence[str], method: str) -> list[str]:
    """The class names as a list; an empty list, a non-string name or two names that CLIP reads as one
    (:func:`~visionpeft.vla.data.duplicate_classnames`: their logits would be equal) is a :class:`ConfigError`."""
    names = list(classnames)
    if not names:
        raise ConfigError(
            f"{method}.classnames: the class list is empty; pass the names of the classes to classify, "
            f"e.g. vp.attach(clip, {method!r}, classnames=['cat', 'dog'])"
        )
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ConfigError(f"{method}.classnames: every class name must be a non-empty string, got {bad[:3]}")
    problem = duplicates_problem(names, lambda i: f"{names[i]!r} (class {i})", "give each class a distinct name")
    if problem:
        raise ConfigError(f"{method}.classnames: {problem}")
    return names


def check_distinct_prompts(tokens: torch.Tensor, classnames: Sequence[str]) -> None:
    """Refuse two classes whose prompts tokenize alike (a tokenizer that drops punctuation, truncation): their
    text features would be equal. Rows of ``tokens`` are the classes' prompts."""
    seen: dict[tuple[int, ...], int] = {}
    for index, row in enumerate(tokens.tolist()):
        first = seen.setdefault(tuple(row), index)
        if first != index:
            raise ConfigError(
                f"classnames: {classnames[first]!r} (class {first}) and {classnames[index]!r} (class {index}) give "
                "the same prompt tokens: the classifier could never tell them apart; give each class a distinct name"
            )


@dataclass
class ClassPrompts:
    """The tokenized prompts of a class list and the embeddings of their fixed parts."""

    tokens: torch.Tensor  # (C, L) token ids; the EOT position is where pooling reads
    prefix: torch.Tensor  # (C, 1, D) start token
    suffix: torch.Tensor  # (C, L - 1 - n_ctx, D) class tokens, ".", EOT, padding
    name_lens: list[int]  # BPE tokens of each class name


def build_class_prompts(
    tower: TextTower, tokenizer: Any, prefix_text: str, classnames: Sequence[str], n_ctx: int
) -> ClassPrompts:
    """Tokenize ``"{prefix_text} {name}."`` per class and embed it with the frozen token embedding."""
    names = [prompt_classname(n) for n in classnames]
    texts = [f"{prefix_text} {name}." for name in names]
    device = tower.token_embedding.weight.device
    tokens = tokenizer(texts)
    check_distinct_prompts(tokens, classnames)
    tokens = tokens.to(device)
    sot = getattr(tokenizer, "sot_token_id", None)
    if sot is None or bool((tokens[:, 0] != sot).any()) or tower.pool_type not in ("argmax", "eos"):
        raise UnsupportedModelError(
            "prompt learning needs CLIP's prompt layout [start token, context, class, '.', end token] read at the "
            f"end token; this model's tokenizer ({type(tokenizer).__name__}) or pooling ({tower.pool_type!r}) "
            "does not give it (e.g. SigLIP's)"
        )
    if tokens.shape[1] != tower.context_length:
        raise ConfigError(
            f"the tokenizer pads to {tokens.shape[1]} tokens but the text tower has {tower.context_length} positions; "
            "pass the model's own tokenizer (tokenizer: the open_clip model name)"
        )
    with torch.no_grad():
        embedding = tower.embed(tokens)
    return ClassPrompts(
        tokens=tokens,
        prefix=embedding[:, :1].clone(),
        suffix=embedding[:, 1 + n_ctx :].clone(),
        name_lens=[count_tokens(tokenizer, name) for name in names],
    )


def init_context(tower: TextTower, tokenizer: Any, ctx_init: str | None, n_ctx: int, shape: tuple[int, ...],
                 std: float) -> tuple[torch.Tensor, str]:
    """The initial context vectors and the prompt prefix text they stand for.

    With ``ctx_init`` (e.g. ``"a photo of a"``), the embeddings of its first ``n_ctx`` tokens and
    the text itself; otherwise N(0, std) and ``"X X ... X"``, as CoOp.
    """
    weight = tower.token_embedding.weight
    if ctx_init is not None:
        tokens = tokenizer([ctx_init]).to(weight.device)
        with torch.no_grad():
            ctx = tower.embed(tokens)[0, 1 : 1 + n_ctx].float().clone()
        if len(shape) == 3:  # class-specific contexts, every class from the same words
            ctx = ctx.unsqueeze(0).repeat(shape[0], 1, 1)
        return ctx, ctx_init
    ctx = torch.empty(shape, dtype=torch.float32, device=weight.device)
    nn.init.normal_(ctx, std=std)
    return ctx, " ".join(["X"] * n_ctx)


def context_length_of(tokenizer: Any, ctx_init: str, method: str) -> int:
    """The number of tokens of ``ctx_init``; an empty text is a :class:`ConfigError`."""
    n = count_tokens(tokenizer, ctx_init)
    if n < 1:
        raise ConfigError(f"{method}.ctx_init: {ctx_init!r} gives no token; give words such as 'a photo of a'")
    return n


class PromptLearner(nn.Module):
    """Base class of the prompt learners: the tokenizer, the class list and the fixed-part buffers.

    Subclasses set ``n_fixed_ctx`` (the number of positions between the start token and the
    suffix that the learner fills) and ``prefix_text`` before calling :meth:`set_classnames`.
    """

    n_prompt: int
    prefix_text: str

    def __init__(self, clip: nn.Module, tokenizer_name: str | None) -> None:
        super().__init__()
        tower = text_tower(clip)
        self.__dict__["_tower"] = tower  # not a submodule: the CLIP model stays the wrapper's
        self.tokenizer = get_tokenizer(tokenizer_name, tower.context_length)
        self.classnames: list[str] = []
        self.name_lens: list[int] = []

    @property
    def tower(self) -> TextTower:
        return self.__dict__["_tower"]

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the prompts' fixed parts for ``classnames`` (the learned tensors stay as they are)."""
        prompts = build_class_prompts(self.tower, self.tokenizer, self.prefix_text, classnames, self.n_prompt)
        self.classnames = list(classnames)
        self.name_lens = prompts.name_lens
        self.register_buffer("tokenized_prompts", prompts.tokens, persistent=False)
        self.register_buffer("token_prefix", prompts.prefix, persistent=False)
        self.register_buffer("token_suffix", prompts.suffix, persistent=False)

    @property
    def n_cls(self) -> int:
        return len(self.classnames)


def _input_dtype(visual: nn.Module) -> torch.dtype:
    # The first layer's: with OpenAI-style low-precision weights the embeddings stay fp32.
    conv = getattr(visual, "conv1", None)
    if conv is not None:
        return conv.weight.dtype
    for p in visual.parameters():
        return p.dtype
    return torch.float32


class PromptedCLIP(nn.Module):
    """A frozen open_clip model with a prompt learner; ``forward(images)`` gives class logits.

    Subclasses implement :meth:`forward`. ``clip`` is the untouched model that ``vp.detach``
    returns.
    """

    def __init__(self, clip: nn.Module, prompt_learner: PromptLearner) -> None:
        super().__init__()
        self.clip = clip
        self.prompt_learner = prompt_learner
        self._cached: tuple[tuple, torch.Tensor] | None = None

    def cached_without_grad(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, reused across calls while no gradient is taken and nothing it reads changed.

        Class text features do not depend on the images: an evaluation would otherwise run the
        text tower over every class prompt for every batch. The key holds every learner tensor's
        storage, in-place version (an optimizer step or a load changes it) and, for the learned
        tensors, their sum (which catches edits through ``.data``), the class list and the
        autocast state, so a stale value is never returned; with gradients on it is not used.
        """
        if torch.is_grad_enabled():
            self._cached = None
            return compute()
        learner = self.prompt_learner
        key = (
            tuple((t.data_ptr(), t._version, t.dtype) for t in (*learner.parameters(), *learner.buffers())),
            tuple(float(p.detach().float().sum()) for p in learner.parameters()),
            tuple(learner.classnames),
            torch.is_autocast_enabled("cuda"), torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cuda"), torch.get_autocast_dtype("cpu"),
        )
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, compute())
        return self._cached[1]

    @property
    def classnames(self) -> list[str]:
        return list(self.prompt_learner.classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Classify among ``classnames`` from now on; the learned context is kept (base → novel)."""
        self.prompt_learner.set_classnames(check_classnames(classnames, "classnames"))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features of the frozen image tower."""
        visual = self.clip.visual
        features = visual(images.to(_input_dtype(visual)))
        return F.normalize(features.float(), dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """``logit_scale.exp()`` x cosine similarity (both inputs normalised), plus a logit bias if any.

        ``image_features`` is ``(B, E)``; ``text_features`` is ``(C, E)``, the same classes for every
        image, or ``(B, C, E)``, each image's own (CoCoOp). The logits are ``(B, C)``.
        """
        scale = self.clip.logit_scale.exp().float()
        if text_features.dim() == 3:
            logits = scale * torch.einsum("be,bce->bc", image_features, text_features)
        else:
            logits = scale * image_features @ text_features.transpose(-1, -2)
        bias = getattr(self.clip, "logit_bias", None)
        return logits + bias.float() if bias is not None else logits


class PromptMethod(Method):
    """Base of the vla methods: the model check, the wrapper, and what trains (the prompt learner)."""

    domain = "vla"
    Wrapper: ClassVar[type[PromptedCLIP]] = PromptedCLIP

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        try:
            import open_clip

            if not isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP)):
                return False
            text_tower(model)
            cls.check_model(model)
        except (ImportError, ValueError):
            return False
        return True

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        """Raise :class:`~visionpeft.errors.UnsupportedModelError` when the method cannot use ``model``."""

    @classmethod
    def supported_families(cls) -> list[str]:
        return [SUPPORTED]

    def build_learner(self, clip: nn.Module) -> PromptLearner:
        """The method's prompt learner for ``clip`` (its new parameters in fp32, requiring grad)."""
        raise NotImplementedError

    def attach(self, model: nn.Module) -> nn.Module:
        classnames = check_classnames(self.config.classnames, self.name)
        learner = self.build_learner(model)
        learner.set_classnames(classnames)
        return self.wrap(model, learner)

    def wrap(self, clip: nn.Module, learner: PromptLearner) -> PromptedCLIP:
        """The module ``vp.attach`` returns: ``clip`` and its prompt learner."""
        return self.Wrapper(clip, learner)

    def detach(self, model: nn.Module) -> nn.Module:
        return model.clip

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"prompt_learner.{n}": p for n, p in model.prompt_learner.named_parameters()}

    def train_modules(self, model: nn.Module) -> list[nn.Module] | None:
        # The frozen CLIP stays in eval mode, as in the original trainers (CLIP has no dropout).
        return [model.prompt_learner]

    def export(self, model: nn.Module, output_dir: str | os.PathLike, run: RunInfo) -> None:
        """Write ``nearest_words.json`` for a learned context (the CoOp paper's interpretation), and log it."""
        if getattr(model.prompt_learner, "ctx", None) is None:
            return
        from visionpeft.vla.interpret import format_nearest_words, write_nearest_words

        records = write_nearest_words(model, Path(output_dir) / "nearest_words.json")
        logger.info("nearest words of the learned context:\n%s", format_nearest_words(records))
