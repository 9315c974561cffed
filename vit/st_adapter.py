"""ST-Adapter (Pan et al., NeurIPS 2022): spatio-temporal adapters for image ViTs on video.

As in the official code (linziyi96/st-adapter): ``fc1`` (dim → bottleneck) → depth-wise
``Conv3d`` over ``(T, H, W)`` with kernel ``(3, 1, 1)`` → ``fc2`` (bottleneck → dim), added to the
residual stream, applied to the patch tokens only (the class token bypasses it). The conv and the
biases start at zero, so the model is unchanged at attach while gradients still flow. Adapters sit
before the attention and/or before the MLP of the last ``layers`` blocks: before the MLP only is
the K400 configuration (12 x 384), both is the SSv2 one (24 x 384). The model is a
:class:`~visionpeft.vit.video.VideoClassifier`, whose frames are folded into the batch; the
adapter unfolds them to convolve over time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from visionpeft.config import MethodConfig, field
from visionpeft.errors import ConfigError, UnsupportedModelError
from visionpeft.vit.base import HEAD_HELP, HeadRecipe, VitMethod
from visionpeft.vit.surface import adapted_block, every_block, find_vit, num_extra_tokens, release_block


@dataclasses.dataclass
class STAdapterConfig(MethodConfig):
    """ST-Adapter's defaults: bottleneck 384, kernel (3, 1, 1), before the MLP of every block."""

    bottleneck: int = field(384, help="adapter width", ge=1)
    kernel_size: tuple[int, ...] = field((3, 1, 1), help="depth-wise Conv3d kernel over (T, H, W); odd sizes",
                                         ge=1)
    positions: list[Literal["before_attn", "before_mlp"]] = field(
        ["before_mlp"], help="where in each block: before_mlp (K400 recipe), add before_attn for SSv2"
    )
    layers: int | None = field(None, help="adapt the last N blocks; default: all", ge=1)
    head: HeadRecipe = field("plain", help=HEAD_HELP)

    def check(self) -> None:
        if len(self.kernel_size) != 3 or any(k % 2 == 0 for k in self.kernel_size):
            raise ConfigError(f"st_adapter.kernel_size: {list(self.kernel_size)} must be three odd sizes (T, H, W)")
        if not self.positions or len(set(self.positions)) != len(self.positions):
            raise ConfigError(f"st_adapter.positions: {self.positions} must name before_attn and/or before_mlp once")


class STAdapterModule(nn.Module):
    """One adapter: fc1 → depth-wise Conv3d over (T, H, W) → fc2, on patch tokens, residual."""

    def __init__(self, dim: int, bottleneck: int, kernel_size: tuple[int, int, int], num_frames: int,
                 vit: nn.Module, like: torch.Tensor) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.fc1 = nn.Linear(dim, bottleneck, **kw)
        self.conv = nn.Conv3d(bottleneck, bottleneck, kernel_size, padding=tuple(k // 2 for k in kernel_size),
                              groups=bottleneck, **kw)
        self.fc2 = nn.Linear(bottleneck, dim, **kw)
        for module in (self.conv,):
            nn.init.zeros_(module.weight)
        for module in (self.fc1, self.conv, self.fc2):
            nn.init.zeros_(module.bias)
        self.num_frames = num_frames
        # A plain reference (not a submodule) to read the prefix and extra token counts at run time.
        self.__dict__["_vit"] = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.__dict__["_vit"]
        start = vit.num_prefix_tokens + num_extra_tokens(vit)
        bt, n = x.shape[:2]
        t = self.num_frames
        if bt % t:
            raise ValueError(f"ST-Adapter: a batch of {bt} frames is not a whole number of {t}-frame clips")
        tokens = n - start
        h, w = _grid(vit, tokens)
        y = self.fc1(x[:, start:])
        y = y.view(bt // t, t, h, w, -1).permute(0, 4, 1, 2, 3)
        y = self.conv(y)
        y = y.permute(0, 2, 3, 4, 1).reshape(bt, tokens, -1)
        y = self.fc2(y)
        return torch.cat([x[:, :start], x[:, start:] + y], dim=1)


def _grid(vit: nn.Module, tokens: int) -> tuple[int, int]:
    grid = getattr(vit.patch_embed, "grid_size", None)
    if grid is not None and grid[0] * grid[1] == tokens:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(tokens)
    if side * side == tokens:
        return side, side
    raise ValueError(f"ST-Adapter: cannot lay {tokens} patch tokens out on a grid; use square inputs")


class STAdapter(VitMethod):
    """Spatio-temporal adapters for video classification with a frozen image ViT."""

    name = "st_adapter"
    description = "ST-Adapter depth-wise Conv3d adapters for video (timm ViT in a VideoClassifier); adapters + head"
    Config = STAdapterConfig
    needs_standard_blocks = True
    video = True
    starts_as_identity = True

    def insert(self, model: nn.Module) -> None:
        vit = find_vit(model)
        if not hasattr(model, "num_frames"):
            raise UnsupportedModelError("ST-Adapter needs a VideoClassifier, which knows the number of frames")
        cfg = self.config
        like = next(vit.blocks[0].parameters()).detach()
        self._indices = every_block(model, cfg.layers)
        for i in self._indices:
            block = adapted_block(model, i)
            for position in cfg.positions:
                getattr(block, position)[self.adapter_name] = STAdapterModule(
                    vit.embed_dim, cfg.bottleneck, tuple(cfg.kernel_size), model.num_frames, vit, like
                )

    def remove(self, model: nn.Module, merge: bool = False) -> None:
        vit = find_vit(model)
        for i in self._indices:
            for position in self.config.positions:
                del getattr(vit.blocks[i], position)[self.adapter_name]
            release_block(model, i)

    def _adapters(self, model: nn.Module) -> dict[str, STAdapterModule]:
        vit = find_vit(model)
        return {
            f"blocks.{i}.{position}": getattr(vit.blocks[i], position)[self.adapter_name]
            for i in self._indices
            for position in self.config.positions
        }

    def own_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{k}.{n}": p for k, a in self._adapters(model).items() for n, p in a.named_parameters()}

    def own_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(self._adapters(model).values())
