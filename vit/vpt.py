"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022), shallow and deep, on timm ViTs.

As in the official code (KMnP/vpt): ``P`` learnable prompts are inserted after the prefix tokens
(class and register tokens) and after the position embedding, so they carry no position
embedding; deep VPT replaces the previous layer's outputs at the prompt positions with fresh
prompts before every block after the first; prompts are drawn from U(-b, b) with
``b = sqrt(6 / (3·patch_h·patch_w + dim))`` and pass through a dropout. The prompt outputs are
removed before pooling, so class-token and average-pooled heads read what they read without them.

Insertion uses forward hooks: a pre-hook on ``norm_pre`` (after the position embedding and
patch dropout, so on CLIP ViTs the prompts also go through ``ln_pre``), pre-hooks on blocks
``1..L-1`` for deep prompts, and a hook on ``norm`` that drops the prompt positions.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from visionpeft.config import MethodConfig, field
from visionpeft.errors import AdapterError
from visionpeft.vit.base import HEAD_HELP, HeadRecipe, VitMethod
from visionpeft.vit.surface import drop_extra_tokens, find_vit, num_extra_tokens, patch_size, set_extra_tokens


@dataclasses.dataclass
class VPTConfig(MethodConfig):
    """VPT's hyper-parameters; the paper tunes ``num_tokens`` per task in {1, 5, 10, 50, 100, 200}."""

    num_tokens: int = field(10, help="prompts per layer (P)", ge=1)
    deep: bool = field(False, help="deep VPT: new prompts before every block; shallow: only at the input")
    dropout: float = field(0.0, help="dropout on the prompts (the VPT demo uses 0.1 for deep, 0 for shallow)",
                           ge=0, lt=1)
    head: HeadRecipe = field("plain", help=HEAD_HELP)


class VisualPrompts(nn.Module):
    """The prompts of one VPT adapter: ``(layers, P, D)``, uniform init, with dropout."""

    def __init__(self, layers: int, num_tokens: int, dim: int, bound: float, dropout: float,
                 like: torch.Tensor) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(layers, num_tokens, dim, device=like.device, dtype=like.dtype))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(dropout)

    def layer(self, index: int, batch: int) -> torch.Tensor:
        """The prompts entering block ``index``, expanded over the batch (one dropout mask per sample)."""
        return self.dropout(self.prompts[index].unsqueeze(0).expand(batch, -1, -1))


def init_bound(vit: nn.Module) -> float:
    """VPT's uniform bound ``sqrt(6 / (3·patch_h·patch_w + dim))`` (0.0625 for ViT-B/16)."""
    ph, pw = patch_size(vit)
    return math.sqrt(6.0 / (3 * ph * pw + vit.embed_dim))


class VPT(VitMethod):
    """Learnable prompt tokens in the input (shallow) or before every block (deep)."""

    name = "vpt"
    description = "VPT visual prompt tuning (shallow or deep) for timm ViTs; prompts + head train"
    Config = VPTConfig
    starts_as_identity = False
    _handles: tuple = ()

    def _prompts(self, model: nn.Module) -> VisualPrompts:
        return find_vit(model).vpt_prompts[self.adapter_name]

    def insert(self, model: nn.Module) -> None:
        vit = find_vit(model)
        if hasattr(vit, "vpt_prompts"):
            raise AdapterError("a VPT adapter is already attached; one VPT per model (vp.detach it first)")
        cfg = self.config
        layers = len(vit.blocks) if cfg.deep else 1
        like = vit.pos_embed if vit.pos_embed is not None else next(vit.parameters())
        vit.vpt_prompts = nn.ModuleDict(
            {self.adapter_name: VisualPrompts(layers, cfg.num_tokens, vit.embed_dim, init_bound(vit), cfg.dropout,
                                              like.detach())}
        )
        prompts = self._prompts(model)
        start = vit.num_prefix_tokens + num_extra_tokens(vit)

        def insert_prompts(module, args):
            x = args[0]
            return (torch.cat([x[:, :start], prompts.layer(0, x.shape[0]).to(x.dtype), x[:, start:]], dim=1),
                    *args[1:])

        handles = [vit.norm_pre.register_forward_pre_hook(insert_prompts)]
        if cfg.deep:
            for i in range(1, len(vit.blocks)):
                handles.append(vit.blocks[i].register_forward_pre_hook(self._replacer(prompts, i, start),
                                                                       with_kwargs=True))
        handles.append(vit.norm.register_forward_hook(self._stripper(vit)))
        set_extra_tokens(vit, self.adapter_name, cfg.num_tokens)
        self._handles = tuple(handles)

    @staticmethod
    def _replacer(prompts: VisualPrompts, index: int, start: int):
        def replace(module, args, kwargs):
            x = args[0]
            p = prompts.layer(index, x.shape[0]).to(x.dtype)
            x = torch.cat([x[:, :start], p, x[:, start + p.shape[1]:]], dim=1)
            return (x, *args[1:]), kwargs

        return replace

    @staticmethod
    def _stripper(vit: nn.Module):
        def strip(module, args, output):
            # Token sequences (B, N, D) lose the prompt positions; pooled features (B, D) pass.
            return drop_extra_tokens(vit, output) if output.dim() == 3 else output

        return strip

    def remove(self, model: nn.Module, merge: bool = False) -> None:
        vit = find_vit(model)
        for handle in self._handles:
            handle.remove()
        self._handles = ()
        set_extra_tokens(vit, self.adapter_name, 0)
        del vit.vpt_prompts

    def own_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"prompts": self._prompts(model).prompts}

    def own_modules(self, model: nn.Module) -> list[nn.Module]:
        return [self._prompts(model)]
