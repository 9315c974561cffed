"""SSF, Scale and Shift Features (Lian et al., NeurIPS 2022): a learned per-channel affine after layers.

As in the official code (dongzelian/SSF, ``models/vision_transformer.py``, ``tuning_mode='ssf'``;
reference ``more-methods.md`` §3.4): ``x·gamma + beta`` over the channel dimension after ``norm1``,
``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1`` (before the activation) and ``mlp.fc2`` of
every block, after the patch embedding's projection (and after its norm, when it has one), and
after the final ``norm``: 205,824 parameters on ViT-B/16, plus the head.

The original's init, the default, draws gamma ~ N(1, 0.02) and beta ~ N(0, 0.02): the adapted model is
*not* the base model at attach, its output differs slightly. ``init: identity`` starts at gamma = 1,
beta = 0, exactly the base model's output.

Every SSF follows a linear map or a LayerNorm, so :func:`visionpeft.merge` folds it into that
layer's weight and bias and leaves a plain timm ViT. A layer without a bias (the patch embedding
of timm's CLIP ViTs) gets one when merged. An SSF attached over an (IA)³ adapter cannot merge (its
shift does not fold through the key and value scales): ``vp.merge`` refuses before changing anything.

One difference from the original: in an average-pooled ViT the final ``norm`` is an ``Identity``
and the LayerNorm is ``fc_norm``, after the pooling. The original scales the tokens before the
pooling there, where no layer can absorb it; here the last SSF follows ``fc_norm`` instead, so the
adapter still merges. ``norm_pre`` (CLIP-style ViTs) gets none, as in the original.

open_clip's vision tower is refused (:class:`~visionpeft.errors.UnsupportedModelError`): its
``nn.MultiheadAttention`` reads the fused ``in_proj_weight`` and ``out_proj.weight`` directly, so
there is no qkv or proj output to scale without re-implementing the attention.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from visionpeft.config import MethodConfig, field
from visionpeft.errors import UnsupportedModelError
from visionpeft.vit.base import VitMethod
from visionpeft.vit.sites import FOLDABLE, LayerWrapper, Site, block_site, can_fold_output, fold_output
from visionpeft.vit.surface import SUPPORTED, find_vit

#: The layers of a block SSF follows, in forward order (reference §3.4).
BLOCK_LAYERS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


@dataclasses.dataclass
class SSFConfig(MethodConfig):
    """SSF's init; the original's is the default. Everything else (placements) is fixed by the paper."""

    init: Literal["paper", "identity"] = field(
        "paper", help="paper: gamma ~ N(1, 0.02), beta ~ N(0, 0.02) as the original (not the base model at attach); "
        "identity: gamma = 1, beta = 0"
    )


class ScaleShift(LayerWrapper):
    """``base(x)·gamma + beta`` per output channel (the last dimension, or dimension 1 of a conv's NCHW output)."""

    def __init__(self, base: nn.Module, channels: int, channels_last: bool, init: str, like: torch.Tensor) -> None:
        super().__init__(base)
        kw = {"device": like.device, "dtype": like.dtype}
        self.scale = nn.Parameter(torch.ones(channels, **kw))
        self.shift = nn.Parameter(torch.zeros(channels, **kw))
        if init == "paper":
            nn.init.normal_(self.scale, mean=1.0, std=0.02)
            nn.init.normal_(self.shift, mean=0.0, std=0.02)
        self.channels_last = channels_last

    def _shaped(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.channels_last else t.view(-1, 1, 1)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.base(*args, **kwargs) * self._shaped(self.scale) + self._shaped(self.shift)

    def absorbs_output(self, shift: bool) -> bool:
        return True

    def absorb_output(self, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
        # s·(gamma·y + beta) + t = (s·gamma)·y + (s·beta + t): another adapter's affine on top composes into this one.
        with torch.no_grad():
            self.scale.mul_(scale.to(self.scale.dtype))
            self.shift.mul_(scale.to(self.shift.dtype))
            if shift is not None:
                self.shift.add_(shift.to(self.shift.dtype))


def _is_identity(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity)


def ssf_sites(vit: nn.Module) -> list[Site]:
    """Where SSF goes in ``vit``, in forward order; :class:`UnsupportedModelError` if a layer is missing.

    Each site's layer is a ``Linear``, ``Conv2d`` (the patch embedding) or ``LayerNorm``.
    """
    embed = vit.patch_embed
    if not hasattr(embed, "proj"):
        raise UnsupportedModelError(f"ssf: the patch embedding is a {type(embed).__qualname__} without proj")
    sites = [Site("patch_embed.proj", embed, "proj")]
    if not _is_identity(getattr(embed, "norm", nn.Identity())):
        sites.append(Site("patch_embed.norm", embed, "norm"))
    for i in range(len(vit.blocks)):
        sites += [block_site(vit, i, path) for path in BLOCK_LAYERS]
    if not _is_identity(vit.norm):
        sites.append(Site("norm", vit, "norm"))
    elif not _is_identity(getattr(vit, "fc_norm", nn.Identity())):
        sites.append(Site("fc_norm", vit, "fc_norm"))
    for site in sites:
        site.require(FOLDABLE, "ssf")
    return sites


class SSF(VitMethod):
    """A learned scale and shift of the features after every linear layer and norm of a timm ViT."""

    name = "ssf"
    description = "SSF scale-and-shift after every linear layer and norm (timm ViTs); mergeable; SSF + head train"
    Config = SSFConfig
    mergeable = True
    starts_as_identity = False
    _wrappers: tuple[tuple[Site, ScaleShift], ...] = ()

    @classmethod
    def check_vit(cls, vit: nn.Module) -> None:
        ssf_sites(vit)

    @classmethod
    def supported_families(cls) -> list[str]:
        return [f"{SUPPORTED}, with timm's Attention (qkv, proj), Mlp (fc1, fc2) and LayerNorms"]

    def insert(self, model: nn.Module) -> None:
        wrappers = []
        for site in ssf_sites(find_vit(model)):
            layer = site.layer()
            wrapper = ScaleShift(site.module, layer.weight.shape[0], not isinstance(layer, nn.Conv2d),
                                 self.config.init, layer.weight.detach())
            wrappers.append((site, wrapper))
        for site, wrapper in wrappers:
            site.wrap(wrapper)
        self._wrappers = tuple(wrappers)
        # On (IA)³'s key/value scales a shift cannot fold; vp.merge reads this adapter's own flag and
        # refuses before changing anything.
        self.mergeable = all(can_fold_output(w.base, shift=True) for _, w in wrappers)

    def remove(self, model: nn.Module, merge: bool = False) -> None:
        for site, wrapper in reversed(self._wrappers):
            base = site.unwrap(wrapper)
            if merge:
                fold_output(base, wrapper.scale, wrapper.shift)
        self._wrappers = ()

    def own_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tensors = {}
        for site, wrapper in self._wrappers:
            tensors[f"{site.label}.ssf_scale"] = wrapper.scale
            tensors[f"{site.label}.ssf_shift"] = wrapper.shift
        return tensors
