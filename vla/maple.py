"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023; muzairkhattak/multimodal-prompt-learning).

Deep prompts in both towers, coupled. The layer-0 text context is the embedding of the first
``n_ctx`` tokens of ``ctx_init`` ("a photo of a": "a", "photo"), with the rest of the sentence
("of a {class}.") kept fixed. Text prompts of layers ``1..depth-1`` are N(0, 0.02) vectors that
replace the context positions before those blocks. Each vision prompt is a linear image of the text
prompt of its depth (the coupling function, one ``Linear(text width → vision width)`` per depth,
the deeper ones cloned from one layer as the original does); the layer-0 vision prompts are appended
after the patch tokens, after the positional embedding and before ``ln_pre``, and replaced before
blocks ``1..depth-1``. Everything else is frozen. ViT image towers only.

``coupling=False`` drops the vision prompts (language-only deep prompting, the paper's ablation);
with ``prompt_depth=1`` as well this is plain CoOp-style prompting of the text tower.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from visionpeft.config import MethodConfig, field
from visionpeft.errors import ConfigError
from visionpeft.vla.prompts import PromptedCLIP, PromptLearner, PromptMethod, init_context
from visionpeft.vla.text import count_tokens, encode_embeddings
from visionpeft.vla.vision import encode_image_with_prompts, vision_transformer, vision_width


@dataclasses.dataclass
class MaPLeConfig(MethodConfig):
    """MaPLe's hyper-parameters; defaults of ``vit_b16_c2_ep5_batch4_2ctx`` (2 contexts, depth 9)."""

    method = "maple"
    classnames: list[str] = field([], help="the class names to classify (filled from the data set by the task)")
    n_ctx: int = field(2, help="prompt tokens per layer in each tower", ge=1)
    ctx_init: str | None = field("a photo of a", help="the sentence whose first n_ctx tokens start the text context")
    prompt_depth: int = field(9, help="layers that get prompts (1: the input only)", ge=1)
    coupling: bool = field(True, help="vision prompts projected from the text prompts (false: text prompts only)")
    init_std: float = field(0.02, help="std of the random prompt init", gt=0)
    tokenizer: str | None = field(None, help="open_clip model name whose tokenizer to use (default: OpenAI BPE)")


class MaPLePromptLearner(PromptLearner):
    """The text prompts of every depth and their projections to vision prompts."""

    def __init__(self, clip: nn.Module, config: MaPLeConfig) -> None:
        super().__init__(clip, config.tokenizer)
        n_ctx, width = config.n_ctx, self.tower.width
        if config.ctx_init is not None and count_tokens(self.tokenizer, config.ctx_init) < n_ctx:
            raise ConfigError(
                f"maple.ctx_init: {config.ctx_init!r} has fewer than n_ctx={n_ctx} tokens to start the context from; "
                "use a longer sentence, a smaller n_ctx, or ctx_init: null"
            )
        ctx, self.prefix_text = init_context(self.tower, self.tokenizer, config.ctx_init, n_ctx, (n_ctx, width),
                                             config.init_std)
        device = ctx.device
        self.ctx = nn.Parameter(ctx)
        self.n_prompt = n_ctx
        deep = config.prompt_depth - 1
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx, width, device=device).normal_(std=config.init_std)) for _ in range(deep)]
        )
        self.coupling = config.coupling
        if config.coupling:
            vis = vision_width(clip)
            self.proj = nn.Linear(width, vis, device=device)
            single = nn.Linear(width, vis, device=device)
            self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(single) for _ in range(deep)])

    def forward(self) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
        """Class prompts ``(C, L, D)``, deeper text prompts, layer-0 and deeper vision prompts."""
        prefix, suffix = self.token_prefix, self.token_suffix
        ctx = self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1).to(prefix.dtype)
        prompts = torch.cat([prefix, ctx, suffix], dim=1)
        deep_text = list(self.compound_prompts_text)
        if not self.coupling:
            return prompts, deep_text, None, []
        vision = self.proj(self.ctx)
        deep_vision = [layer(p) for layer, p in zip(self.compound_prompt_projections, deep_text, strict=True)]
        return prompts, deep_text, vision, deep_vision


class MaPLeCLIP(PromptedCLIP):
    """CLIP with MaPLe's deep prompts in both towers."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        learner = self.prompt_learner
        prompts, deep_text, vision, deep_vision = learner()

        def text_features() -> torch.Tensor:
            text = encode_embeddings(learner.tower, prompts, learner.tokenized_prompts, deep_text, learner.n_prompt)
            return F.normalize(text.float(), dim=-1)

        visual = self.clip.visual
        dtype = visual.conv1.weight.dtype
        image = encode_image_with_prompts(visual, images.to(dtype), vision, deep_vision)
        return self.logits(F.normalize(image.float(), dim=-1), self.cached_without_grad(text_features))


class MaPLe(PromptMethod):
    """MaPLe: coupled deep prompts in the text and vision towers (ViT image towers)."""

    name = "maple"
    description = "MaPLe multi-modal deep prompts for CLIP (text prompts coupled to vision prompts)"
    Config = MaPLeConfig
    Wrapper = MaPLeCLIP

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        vision_transformer(model)

    @classmethod
    def supported_families(cls) -> list[str]:
        return ["open_clip.CLIP / open_clip.CustomTextCLIP with a ViT image tower"]

    def build_learner(self, clip: nn.Module) -> PromptLearner:
        from visionpeft.vla.text import text_tower

        depth = self.config.prompt_depth
        layers = {"text": len(text_tower(clip).transformer.resblocks),
                  "vision": len(vision_transformer(clip).transformer.resblocks)}
        too_deep = {k: v for k, v in layers.items() if depth > v}
        if too_deep:
            raise ConfigError(
                f"maple.prompt_depth: {depth} is deeper than the model ({layers}); use at most {min(layers.values())}"
            )
        return MaPLePromptLearner(clip, self.config)
