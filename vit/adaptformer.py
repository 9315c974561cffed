"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck beside each block's MLP.

As in the official code (ShoufaChen/AdaptFormer, ``ffn_option="parallel"``): the branch reads the
post-attention residual ``x`` (before ``norm2``), computes ``up(dropout(ReLU(down(x)))) · s`` with
``s = 0.1`` and dropout 0.1, and its output is added to the block output outside the MLP's
drop-path. ``down`` is kaiming-uniform (``a = sqrt(5)``), ``up`` and both biases are zero, so the
model's output is unchanged at attach. The branch is linear in its input up to the ReLU, so it
cannot be merged into the frozen weights.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from visionpeft.config import MethodConfig, field
from visionpeft.errors import ConfigError
from visionpeft.vit.base import HEAD_HELP, HeadRecipe, VitMethod
from visionpeft.vit.surface import adapted_block, find_vit, release_block


@dataclasses.dataclass
class AdaptFormerConfig(MethodConfig):
    """AdaptFormer's defaults: bottleneck 64, scale 0.1, dropout 0.1, every block."""

    bottleneck: int = field(64, help="hidden width of the bottleneck", ge=1)
    scale: float = field(0.1, help="multiplier of the branch output (s)", ge=0)
    learnable_scale: bool = field(False, help="learn s (one scalar per block), starting at 1.0 as the original")
    dropout: float = field(0.1, help="dropout on the bottleneck activation", ge=0, lt=1)
    layers: list[int] | None = field(None, help="block indices to adapt; default: every block")
    head: HeadRecipe = field("plain", help=HEAD_HELP)

    def check(self) -> None:
        if self.learnable_scale and self.scale != 0.1:
            raise ConfigError(
                "adaptformer.scale: a learnable scale starts at 1.0, as in the original code; leave scale unset "
                "or set learnable_scale: false"
            )
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ConfigError(f"adaptformer.layers: {self.layers} must be non-empty block indices >= 0")


class ParallelAdapter(nn.Module):
    """``up(dropout(relu(down(x)))) · scale``, zero at init."""

    def __init__(self, dim: int, bottleneck: int, scale: float, learnable_scale: bool, dropout: float,
                 like: torch.Tensor) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.down = nn.Linear(dim, bottleneck, **kw)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim, **kw)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if learnable_scale:
            # The original's "learnable_scalar" is nn.Parameter(torch.ones(1)).
            self.scale = nn.Parameter(torch.ones(1, **kw))
        else:
            self.register_buffer("scale", torch.tensor(float(scale), **kw), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale


class AdaptFormer(VitMethod):
    """A parallel bottleneck adapter beside the MLP of each block."""

    name = "adaptformer"
    description = "AdaptFormer parallel bottleneck beside each block's MLP (timm ViTs); adapters + head train"
    Config = AdaptFormerConfig
    needs_standard_blocks = True
    starts_as_identity = True

    def _layers(self, model: nn.Module) -> list[int]:
        depth = len(find_vit(model).blocks)
        layers = self.config.layers if self.config.layers is not None else list(range(depth))
        bad = [i for i in layers if i >= depth]
        if bad:
            raise ConfigError(f"adaptformer.layers: {bad} out of range for a model with {depth} blocks")
        return sorted(set(layers))

    def insert(self, model: nn.Module) -> None:
        vit = find_vit(model)
        cfg = self.config
        like = next(vit.blocks[0].parameters()).detach()
        self._indices = self._layers(model)
        for i in self._indices:
            adapted_block(model, i).beside_mlp[self.adapter_name] = ParallelAdapter(
                vit.embed_dim, cfg.bottleneck, cfg.scale, cfg.learnable_scale, cfg.dropout, like
            )

    def remove(self, model: nn.Module, merge: bool = False) -> None:
        vit = find_vit(model)
        for i in self._indices:
            del vit.blocks[i].beside_mlp[self.adapter_name]
            release_block(model, i)

    def _adapters(self, model: nn.Module) -> dict[int, ParallelAdapter]:
        vit = find_vit(model)
        return {i: vit.blocks[i].beside_mlp[self.adapter_name] for i in self._indices}

    def own_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            f"blocks.{i}.adaptformer.{n}": p for i, a in self._adapters(model).items() for n, p in a.named_parameters()
        }

    def own_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(self._adapters(model).values())
