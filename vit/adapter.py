"""Bottleneck adapters, Houlsby (ICML 2019) and Pfeiffer (EACL 2021), in the blocks of a timm ViT.

An adapter is ``h ← h + W_up act(W_down h + b_d) + b_u`` with a bottleneck of ``dim //
reduction_factor`` (reference ``more-methods.md`` §3.1-3.2):

* ``houlsby``: one adapter on the attention's output (after ``proj`` and its dropout) and one on the
  MLP's output, both inside the residual branch, before LayerScale, drop-path and the residual
  add; swish by default (adapter-hub's ``DoubleSeqBnConfig``). ViT-B/16, reduction 16: 24
  adapters of 2·768·48 + 48 + 768, 1,789,056 parameters.
* ``pfeiffer``: one adapter on the MLP's output only; ReLU by default (adapter-hub's
  ``SeqBnConfig``), the VPT / V-PETL "Adapter" layout. ViT-B/16, reduction 16: 894,528.

``W_up`` and ``b_u`` start at zero, so the model is exactly the base model at attach; ``W_down``
keeps PyTorch's ``Linear`` init. Zeroing both (as V-PETL's code does) would leave every weight
with a zero gradient forever. The adapters are not linear, so they cannot be merged. The layer
norms stay frozen (whether Houlsby trained them is unverified, §6).

open_clip's vision tower is refused (:class:`~visionpeft.errors.UnsupportedModelError`): the
adapters would fit its blocks, but the CLIP model has no classification head for them to train
with, and this domain does not import open_clip.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from visionpeft.config import MethodConfig, field
from visionpeft.errors import ConfigError
from visionpeft.vit.base import VitMethod
from visionpeft.vit.sites import LayerWrapper, Site, block_site
from visionpeft.vit.surface import find_vit

ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}
#: adapter-hub's defaults per variant, and where each variant puts adapters in a block.
DEFAULT_ACTIVATION = {"houlsby": "swish", "pfeiffer": "relu"}
POSITIONS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}


@dataclasses.dataclass
class BottleneckAdapterConfig(MethodConfig):
    """The adapter variant, its width and its activation; adapter-hub's defaults."""

    variant: Literal["houlsby", "pfeiffer"] = field(
        "houlsby", help="houlsby: after the attention and after the MLP of each block; pfeiffer: after the MLP only"
    )
    reduction_factor: int = field(16, help="bottleneck width = model width // reduction_factor", ge=1)
    activation: Literal["swish", "relu", "gelu"] | None = field(
        None, help="nonlinearity of the bottleneck; default: the variant's (houlsby swish, pfeiffer relu)"
    )

    def activation_name(self) -> str:
        """The activation in use: the one given, or the variant's default."""
        return self.activation or DEFAULT_ACTIVATION[self.variant]


class Bottleneck(nn.Module):
    """``up(act(down(h)))``, with ``up`` zero at init."""

    def __init__(self, dim: int, width: int, activation: str, like: torch.Tensor) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.down = nn.Linear(dim, width, **kw)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, dim, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


class WithAdapter(LayerWrapper):
    """``h + adapter(h)`` with ``h = base(...)``: an adapter on a sub-layer's output."""

    def __init__(self, base: nn.Module, adapter: Bottleneck) -> None:
        super().__init__(base)
        self.adapter = adapter

    def forward(self, *args, **kwargs) -> torch.Tensor:
        h = self.base(*args, **kwargs)
        return h + self.adapter(h)


class BottleneckAdapter(VitMethod):
    """Houlsby or Pfeiffer bottleneck adapters inside the residual branches of a timm ViT."""

    name = "adapter"
    description = "Houlsby / Pfeiffer bottleneck adapters in each block (timm ViTs); adapters + head train"
    Config = BottleneckAdapterConfig
    starts_as_identity = True
    _wrappers: tuple[tuple[Site, WithAdapter], ...] = ()

    def _width(self, dim: int) -> int:
        width = dim // self.config.reduction_factor
        if width < 1:
            raise ConfigError(
                f"adapter.reduction_factor: {self.config.reduction_factor} leaves no bottleneck for width {dim}; "
                f"use at most {dim}"
            )
        return width

    def insert(self, model: nn.Module) -> None:
        vit = find_vit(model)
        dim, cfg = vit.embed_dim, self.config
        width = self._width(dim)
        like = next(vit.blocks[0].parameters()).detach()
        sites = [block_site(vit, i, path) for i in range(len(vit.blocks)) for path in POSITIONS[cfg.variant]]
        wrappers = [(s, WithAdapter(s.module, Bottleneck(dim, width, cfg.activation_name(), like))) for s in sites]
        for site, wrapper in wrappers:
            site.wrap(wrapper)
        self._wrappers = tuple(wrappers)

    def remove(self, model: nn.Module, merge: bool = False) -> None:
        for site, wrapper in reversed(self._wrappers):
            site.unwrap(wrapper)
        self._wrappers = ()

    def own_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            f"{site.label}.adapter.{n}": p for site, w in self._wrappers for n, p in w.adapter.named_parameters()
        }

    def own_modules(self, model: nn.Module) -> list[nn.Module]:
        return [w.adapter for _, w in self._wrappers]
