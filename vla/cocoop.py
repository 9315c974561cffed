"""CoCoOp: conditional context optimisation (Zhou et al., CVPR 2022; KaiyangZhou/CoOp ``trainers/cocoop.py``).

CoOp's shared context plus a per-image shift: a meta-net (Linear vis_dim → vis_dim/16, ReLU,
Linear → ctx_dim) maps the normalised image feature to a bias added to every context vector, so
each image gets its own ``n_cls`` prompts. The context and the meta-net train.

The original runs the text tower once per image in a Python loop (hence its batch size of 1).
Here every image's prompts go through the text tower in batched calls over ``B x n_cls``
sequences, in chunks of at most ``text_chunk_size`` sequences, which gives the loop's logits
(to float rounding) without the loop; each call stops at its prompts' last end token (10-20
positions instead of 77, :func:`~visionpeft.vla.text.encode_embeddings`). Chunking bounds the
transient memory of each call (and the whole footprint at evaluation); in training the
activations of all ``B x n_cls`` sequences are kept for the backward pass either way, as in the
loop, unless ``checkpoint_chunks`` recomputes them chunk by chunk.

By default a chunk is 4096 sequences on every device. On CUDA large calls are what makes batching
fast. On CPU (``benchmarks/vla_speed.py``, one thread, training steps) the larger the call the
faster, now that the sequences stop at the end token: tiny CLIP 8 x 100 prompts, one image's
prompts per call 0.214 s, 256 per call 0.178 s, all 800 in one call 0.158 s; tiny CLIP 16 x 200,
200 per call 1.65 s, 1024 per call 0.94 s, all 3200 in one call 0.73 s; ViT-B-16 4 x 10, 10 per
call 2.49 s, all 40 in one call 2.18 s. (At 77 positions, before the cut, calls much larger than
one image's prompts had run slower than the loop on CPU.)
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

# Sequences per text-tower call by default, on CUDA and CPU alike (measurements in the module docstring).
DEFAULT_CHUNK = 4096


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
        f"default {DEFAULT_CHUNK} (on CPU one call of 800 trained 1.35x faster than 100 per call)", ge=1
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

    def _encode(self, embeddings: torch.Tensor, tokens: torch.Tensor, full_length: bool = False) -> torch.Tensor:
        return encode_embeddings(self.prompt_learner.tower, embeddings, tokens, full_length=full_length)

    def text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Normalised class features per image, ``(B, C, E)``."""
        learner = self.prompt_learner
        prompts = learner(image_features)
        batch, classes = prompts.shape[:2]
        flat = prompts.reshape(batch * classes, *prompts.shape[2:])
        tokens = learner.tokenized_prompts.repeat(batch, 1)
        size = self.text_chunk_size or DEFAULT_CHUNK
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
        """The original's per-image loop, for checks and benchmarks: one text-tower call per image, over all
        positions (the original does not stop at the end token)."""
        image_features = self.encode_images(images)
        learner = self.prompt_learner
        prompts = learner(image_features)
        scale = self.clip.logit_scale.exp().float()
        rows = []
        for prompt, feature in zip(prompts, image_features, strict=True):
            text = F.normalize(self._encode(prompt, learner.tokenized_prompts, full_length=True).float(), dim=-1)
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
