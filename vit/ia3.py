"""(IA)³ (Liu et al., NeurIPS 2022, "T-Few"): learned vectors that rescale keys, values and the MLP.

As the paper writes it (reference ``more-methods.md`` §3.3): in every block,
``softmax(Q (l_k ⊙ K)ᵀ / √d_h) (l_v ⊙ V)`` in the attention and ``(l_ff ⊙ act(W_1 x)) W_2`` in the
MLP, with ``l_k, l_v ∈ R^D`` and ``l_ff`` as wide as the MLP; all start at one, so the model is
exactly the base model at attach. On ViT-B/16: 12 · (768 + 768 + 3072) = 55,296 parameters, plus
the head.

timm fuses q, k and v into one ``qkv`` layer, so only its k and v thirds are scaled; the q third is
multiplied by a fixed 1. peft's IA3 on ``qkv`` would scale all three (64,512 parameters on
ViT-B/16), a different method, so it is not used here. ``l_ff`` scales the input of ``mlp.fc2``
(after the activation, the dropout and the MLP's optional norm).

Merging folds ``l_k`` and ``l_v`` into the k and v rows of ``qkv``'s weight and bias (the q rows are
untouched) and ``l_ff`` into ``fc2``'s input columns, leaving a plain timm ViT. ViTs with a
normalisation of the keys (``qk_norm``) are refused: it would undo most of ``l_k``.

open_clip's vision tower is refused (:class:`~visionpeft.errors.UnsupportedModelError`): its
``nn.MultiheadAttention`` projects q, k and v inside one call on ``in_proj_weight``, with no k or v
output to scale short of re-implementing the attention.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from visionpeft.config import MethodConfig
from visionpeft.errors import UnsupportedModelError
from visionpeft.vit.base import VitMethod
from visionpeft.vit.sites import LayerWrapper, Site, block_site, can_fold_output, fold_input, fold_output
from visionpeft.vit.surface import SUPPORTED, find_vit


@dataclasses.dataclass
class IA3Config(MethodConfig):
    """(IA)³ has no hyper-parameters: the vectors start at one, in every block."""


class KeyValueScale(LayerWrapper):
    """``qkv(x) ⊙ [1, l_k, l_v]``: scales the key and value thirds of timm's fused ``qkv`` output."""

    def __init__(self, base: nn.Module, dim: int, like: torch.Tensor) -> None:
        super().__init__(base)
        kw = {"device": like.device, "dtype": like.dtype}
        self.k_scale = nn.Parameter(torch.ones(dim, **kw))
        self.v_scale = nn.Parameter(torch.ones(dim, **kw))
        self.register_buffer("q_scale", torch.ones(dim, **kw), persistent=False)

    def vector(self) -> torch.Tensor:
        """The scale of the whole ``qkv`` output, ``[1, l_k, l_v]``."""
        return torch.cat([self.q_scale, self.k_scale, self.v_scale])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * self.vector()

    def absorbs_output(self, shift: bool) -> bool:
        return not shift

    def absorb_output(self, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
        dim = self.q_scale.numel()
        if shift is not None or not torch.all(scale[:dim] == 1):
            super().absorb_output(scale, shift)
        with torch.no_grad():
            self.k_scale.mul_(scale[dim : 2 * dim].to(self.k_scale.dtype))
            self.v_scale.mul_(scale[2 * dim :].to(self.v_scale.dtype))


class InputScale(LayerWrapper):
    """``base(l ⊙ x)``: scales the input of a layer (``mlp.fc2``, so the MLP's hidden activation)."""

    def __init__(self, base: nn.Module, features: int, like: torch.Tensor) -> None:
        super().__init__(base)
        self.scale = nn.Parameter(torch.ones(features, device=like.device, dtype=like.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x * self.scale)

    def absorbs_output(self, shift: bool) -> bool:
        return can_fold_output(self.base, shift)

    def absorb_output(self, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
        # An output map commutes with an input scale: s ⊙ f(l ⊙ x) + t = f'(l ⊙ x), f' = s ⊙ f + t.
        fold_output(self.base, scale, shift)

    def absorb_input(self, scale: torch.Tensor) -> None:
        with torch.no_grad():
            self.scale.mul_(scale.to(self.scale.dtype))


def ia3_sites(vit: nn.Module) -> list[tuple[Site, Site]]:
    """``(qkv, fc2)`` of every block; :class:`UnsupportedModelError` if a block cannot take (IA)³."""
    sites = []
    for i in range(len(vit.blocks)):
        qkv, fc2 = block_site(vit, i, "attn.qkv"), block_site(vit, i, "mlp.fc2")
        layer = qkv.require((nn.Linear,), "ia3")
        fc2.require((nn.Linear,), "ia3")
        if layer.out_features % 3:
            raise UnsupportedModelError(f"ia3: {qkv.label} has {layer.out_features} outputs, not q, k and v thirds")
        if not isinstance(getattr(qkv.parent, "k_norm", nn.Identity()), nn.Identity):
            raise UnsupportedModelError(
                f"ia3: blocks.{i}.attn normalises its keys (qk_norm), which would undo the key scale; use a ViT "
                "without qk_norm"
            )
        sites.append((qkv, fc2))
    return sites


class IA3(VitMethod):
    """Learned scales of the keys, values and MLP hidden activations of a timm ViT."""

    name = "ia3"
    description = "(IA)³: learned scales of keys, values and MLP activations (timm ViTs); mergeable; + head"
    Config = IA3Config
    mergeable = True
    starts_as_identity = True
    _wrappers: tuple[tuple[Site, KeyValueScale, Site, InputScale], ...] = ()

    @classmethod
    def check_vit(cls, vit: nn.Module) -> None:
        ia3_sites(vit)

    @classmethod
    def supported_families(cls) -> list[str]:
        return [f"{SUPPORTED}, with timm's fused qkv (no qk_norm) and Mlp (fc1, fc2)"]

    def insert(self, model: nn.Module) -> None:
        wrappers = []
        for qkv, fc2 in ia3_sites(find_vit(model)):
            q_layer, f_layer = qkv.layer(), fc2.layer()
            kv = KeyValueScale(qkv.module, q_layer.out_features // 3, q_layer.weight.detach())
            ff = InputScale(fc2.module, f_layer.in_features, f_layer.weight.detach())
            wrappers.append((qkv, kv, fc2, ff))
        for qkv, kv, fc2, ff in wrappers:
            qkv.wrap(kv)
            fc2.wrap(ff)
        self._wrappers = tuple(wrappers)
        # vp.merge reads this adapter's own flag and refuses before changing anything.
        self.mergeable = all(can_fold_output(kv.base, shift=False) for _, kv, _, _ in wrappers)

    def remove(self, model: nn.Module, merge: bool = False) -> None:
        for qkv, kv, fc2, ff in reversed(self._wrappers):
            kv_base, ff_base = qkv.unwrap(kv), fc2.unwrap(ff)
            if merge:
                fold_output(kv_base, kv.vector().detach(), None)
                fold_input(ff_base, ff.scale.detach())
        self._wrappers = ()

    def own_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tensors = {}
        for qkv, kv, fc2, ff in self._wrappers:
            tensors[f"{qkv.label}.ia3_k"] = kv.k_scale
            tensors[f"{qkv.label}.ia3_v"] = kv.v_scale
            tensors[f"{fc2.label}.ia3_ff"] = ff.scale
        return tensors
