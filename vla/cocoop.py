"""CoCoOp: conditional context optimisation (Zhou et al., CVPR 2022; KaiyangZhou/CoOp ``trainers/cocoop.py``).

CoOp's shared context plus a per-image shift: a meta-net (Linear vis_dim → vis_dim/16, ReLU,
Linear → ctx_dim) maps the normalised image feature to a bias added to every context vector, so
each image gets its own ``n_cls`` prompts. The context and the meta-net train.

The original runs the text tower once per image in a Python loop (hence its batch size of 1).
Here every image's prompts go through the text tower in batched calls over ``B x n_cls``
sequences, in chunks of at most ``text_chunk_size`` sequences, which gives the loop's logits
(to float rounding) without the loop. By default a chunk is 4096 sequences on CUDA, where large
calls are what makes batching fast, and one image's prompts on CPU, where larger calls measured
slower than the loop (``benchmarks/vla_speed.py``). Chunking bounds the transient memory of each call (and the
whole footprint at evaluation); in training the activations of all ``B x n_cls`` sequences are
kept for the backward pass either way, as in the loop, unless ``checkpoint_chunks`` recomputes
them chunk by chunk.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionpeft.config import MethodConfig, field
from visionpeft.vla.prompts import PromptedCLIP, PromptLearner, PromptMethod, context_length_of, init_context
from visionpeft.vla.text import encode_embeddings

# Sequences per text-tower call by default. On CUDA large calls are what makes batching fast; on
# CPU calls much larger than one image's prompts run slower than the loop (their activations fall
# out of cache), so the default there keeps the loop's granularity.
CUDA_CHUNK = 4096


@dataclasses.dataclass
class CoCoOpConfig(MethodConfig):
    """CoCoOp's hyper-parameters; defaults of the paper (4 contexts from "a photo of a")."""

    method = "cocoop"
    classnames: list[str] = field([], help="the class names to classify (filled from the data set by the task)")
    n_ctx: int = field(4, help="number of learned context vectors (ignored with ctx_init: its token count)", ge=1)
    ctx_init: str | None = field("a photo of a", help="initialise the context from these words (null: random)")
    init_std: float = field(0.02, help="std of the random context init", gt=0)
    text_chunk_size: int | None = field(
        None, help="at most this many prompt sequences per text-tower call (bounds the memory of each call); "
        f"default: {CUDA_CHUNK} on CUDA, one image's prompts on CPU", ge=1
    )
    checkpoint_chunks: bool = field(
        False, help="recompute each chunk's activations in backward instead of keeping them (less memory)"
    )
    tokenizer: str | None = field(None, help="open_clip model name whose tokenizer to use (default: OpenAI BPE)")


class CoCoOpPromptLearner(PromptLearner):
    """The shared context and the meta-net that shifts it per image."""

    def __init__(self, clip: nn.Module, config: CoCoOpConfig) -> None:
        super().__init__(clip, config.tokenizer)
        n_ctx = config.n_ctx
        if config.ctx_init is not None:
            n_ctx = context_length_of(self.tokenizer, config.ctx_init, "cocoop")
        width = self.tower.width
        ctx, self.prefix_text = init_context(self.tower, self.tokenizer, config.ctx_init, n_ctx, (n_ctx, width),
                                             config.init_std)
        self.ctx = nn.Parameter(ctx)
        self.n_prompt = n_ctx
        vis_dim = clip.visual.output_dim
        device = ctx.device
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, vis_dim // 16, device=device)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(vis_dim // 16, width, device=device)),
        ]))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Every image's prompts, ``(B, C, L, D)``, from normalised image features ``(B, E)``."""
        linear = self.meta_net.linear1
        bias = self.meta_net(image_features.to(linear.weight.dtype))  # (B, D)
        ctx = self.ctx.unsqueeze(0) + bias.unsqueeze(1)  # (B, n_ctx, D)
        batch, classes = ctx.shape[0], self.n_cls
        prefix = self.token_prefix.unsqueeze(0).expand(batch, -1, -1, -1)
        suffix = self.token_suffix.unsqueeze(0).expand(batch, -1, -1, -1)
        ctx = ctx.unsqueeze(1).expand(-1, classes, -1, -1).to(prefix.dtype)
        return torch.cat([prefix, ctx, suffix], dim=2)


class CoCoOpCLIP(PromptedCLIP):
    """CLIP with CoCoOp prompts: per-image class prompts through batched text-tower calls."""

    def __init__(self, clip: nn.Module, prompt_learner: PromptLearner, chunk: int | None,
                 checkpoint_chunks: bool) -> None:
        super().__init__(clip, prompt_learner)
        self.text_chunk_size = chunk
        self.checkpoint_chunks = checkpoint_chunks

    def _encode(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return encode_embeddings(self.prompt_learner.tower, embeddings, tokens)

    def text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Normalised class features per image, ``(B, C, E)``."""
        learner = self.prompt_learner
        prompts = learner(image_features)
        batch, classes = prompts.shape[:2]
        flat = prompts.reshape(batch * classes, *prompts.shape[2:])
        tokens = learner.tokenized_prompts.repeat(batch, 1)
        size = self.text_chunk_size or (CUDA_CHUNK if flat.is_cuda else classes)
        chunks = []
        for start in range(0, flat.shape[0], size):
            part = flat[start : start + size]
            part_tokens = tokens[start : start + size]
            if self.checkpoint_chunks and torch.is_grad_enabled():
                chunks.append(checkpoint(self._encode, part, part_tokens, use_reentrant=False))
            else:
                chunks.append(self._encode(part, part_tokens))
        features = torch.cat(chunks).reshape(batch, classes, -1)
        return F.normalize(features.float(), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image_features = self.encode_images(images)
        return self.logits(image_features, self.text_features(image_features))

    def forward_loop(self, images: torch.Tensor) -> torch.Tensor:
        """The original's per-image loop (one text-tower call per image), for checks and benchmarks."""
        image_features = self.encode_images(images)
        learner = self.prompt_learner
        prompts = learner(image_features)
        scale = self.clip.logit_scale.exp().float()
        rows = []
        for prompt, feature in zip(prompts, image_features, strict=True):
            text = F.normalize(self._encode(prompt, learner.tokenized_prompts).float(), dim=-1)
            rows.append(scale * feature @ text.t())
        return torch.stack(rows)


class CoCoOp(PromptMethod):
    """CoCoOp: CoOp's context shifted per image by a small meta-net."""

    name = "cocoop"
    description = "CoCoOp image-conditional prompt context for CLIP (meta-net; batched over images)"
    Config = CoCoOpConfig
    Wrapper = CoCoOpCLIP

    def build_learner(self, clip: nn.Module) -> PromptLearner:
        return CoCoOpPromptLearner(clip, self.config)

    def wrap(self, clip: nn.Module, learner: PromptLearner) -> PromptedCLIP:
        return CoCoOpCLIP(clip, learner, self.config.text_chunk_size, self.config.checkpoint_chunks)
