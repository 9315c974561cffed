"""A small torch classifier registered as a host, for testing the core without any domain library.

It has the parts methods touch: linear layers with biases, a LayerNorm, dropout, a head, and an
``embed.proj`` whose name ends like the blocks' ``proj`` layers (the suffix-matching trap).
"""

from __future__ import annotations

import torch
from torch import nn

from visionpeft.hosts import Host

IN_FEATURES = 8
NUM_CLASSES = 3


class ToyBlock(nn.Module):
    """A residual MLP block with a ``proj`` output layer."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.drop(self.act(self.fc1(x))))


class ToyEmbed(nn.Module):
    """Input projection whose layer is called ``proj``, like timm's ``patch_embed.proj``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(IN_FEATURES, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class ToyNet(nn.Module):
    """embed → blocks → norm → head."""

    def __init__(self, width: int = 16, depth: int = 2, dropout: float = 0.0, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.embed = ToyEmbed(width)
        self.blocks = nn.ModuleList(ToyBlock(width, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


TOY_HOST = Host(
    family="tests.ToyNet",
    matches=lambda m: isinstance(m, ToyNet),
    lora_targets=[r"blocks\.\d+\.(fc1|proj)"],
    head="head",
)


def toy_net(seed: int = 0, **kwargs) -> ToyNet:
    """A ToyNet with weights fixed by ``seed``."""
    torch.manual_seed(seed)
    return ToyNet(**kwargs)


def toy_inputs(seed: int = 1, batch: int = 4) -> torch.Tensor:
    """A fixed batch of inputs."""
    return torch.randn(batch, IN_FEATURES, generator=torch.Generator().manual_seed(seed))
