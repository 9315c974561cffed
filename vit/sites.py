"""The single layers that SSF, (IA)³ and the bottleneck adapters wrap, and how their maps fold in.

These methods act on the input or the output of one layer of a timm ViT (``attn.qkv``,
``mlp.fc2``, ``norm1``, a block's whole ``attn`` ...). A :class:`Site` names such a layer by its
parent module and attribute, not by a qualified name, so it stays valid when another adapter wraps
the block (AdaptFormer's :class:`~visionpeft.vit.surface.AdaptedBlock`). A :class:`LayerWrapper`
takes the layer's place and calls it as ``base``; wrappers of several adapters nest, and since
adapters are detached newest first, each one finds its own wrapper outermost.

The mergeable methods fold diagonal maps into the layer below their wrapper: :func:`fold_output`
(``scale ⊙ f(x) + shift``) into a ``Linear``, ``Conv2d`` or ``LayerNorm``, :func:`fold_input`
(``f(scale ⊙ x)``) into a ``Linear``. When that layer is another adapter's wrapper, the wrapper
absorbs the map itself (:meth:`LayerWrapper.absorb_output`), or says it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from visionpeft.errors import AdapterError, UnsupportedModelError
from visionpeft.vit.surface import AdaptedBlock

#: Layers a per-output-channel affine folds into (weight and bias rows, or the LayerNorm's affine).
FOLDABLE = (nn.Linear, nn.Conv2d, nn.LayerNorm)


class LayerWrapper(nn.Module):
    """A module in a layer's place that calls the layer (``base``) and changes its input or output."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def absorbs_output(self, shift: bool) -> bool:
        """Whether :meth:`absorb_output` can take an output scale (and, with ``shift``, a shift)."""
        return False

    def absorb_output(self, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
        """Change this wrapper so that its output becomes ``scale ⊙ output + shift``."""
        raise AdapterError(f"a {type(self).__name__} cannot absorb the output map of an adapter attached after it")

    def absorb_input(self, scale: torch.Tensor) -> None:
        """Change this wrapper so that it computes what it computed on ``scale ⊙ input``.

        The default pushes the scale into ``base``: right for wrappers that only change the output.
        """
        fold_input(self.base, scale)


def plain_layer(module: nn.Module) -> nn.Module:
    """The layer under any adapters' wrappers."""
    while isinstance(module, LayerWrapper):
        module = module.base
    return module


@dataclass(eq=False)
class Site:
    """A layer of the ViT, as ``parent.attr``; ``label`` is its name in the ViT (``blocks.0.attn.qkv``)."""

    label: str
    parent: nn.Module
    attr: str

    @property
    def module(self) -> nn.Module:
        """What sits at the site now: the layer, or the outermost adapter's wrapper."""
        return getattr(self.parent, self.attr)

    def layer(self) -> nn.Module:
        """The layer under any adapters' wrappers."""
        return plain_layer(self.module)

    def require(self, types: tuple[type, ...], method: str) -> nn.Module:
        """The plain layer, or :class:`UnsupportedModelError` when it is not one of ``types``."""
        layer = self.layer()
        if not isinstance(layer, types) or (isinstance(layer, nn.LayerNorm) and layer.weight is None):
            wanted = " or ".join(t.__name__ for t in types)
            raise UnsupportedModelError(
                f"{method}: {self.label} is a {type(layer).__qualname__}, not a {wanted} with weights; this method "
                "adapts timm ViTs whose blocks have timm's Attention (fused qkv) and Mlp (fc1, fc2) and LayerNorms"
            )
        return layer

    def wrap(self, wrapper: LayerWrapper) -> None:
        """Put ``wrapper`` (whose ``base`` is what sits here now) in the layer's place."""
        if wrapper.base is not self.module:
            raise AdapterError(f"the wrapper for {self.label} does not wrap what sits there")
        setattr(self.parent, self.attr, wrapper)

    def unwrap(self, wrapper: LayerWrapper) -> nn.Module:
        """Put back what ``wrapper`` wrapped and return it; ``wrapper`` must be outermost."""
        if self.module is not wrapper:
            raise AdapterError(
                f"{self.label} holds a {type(self.module).__qualname__} over this adapter's wrapper; detach the "
                "adapters attached after it first"
            )
        setattr(self.parent, self.attr, wrapper.base)
        return wrapper.base


def inner_blocks(vit: nn.Module) -> list[nn.Module]:
    """The ViT's timm blocks, looking through AdaptFormer's / ST-Adapter's :class:`AdaptedBlock`."""
    return [b.block if isinstance(b, AdaptedBlock) else b for b in vit.blocks]


def block_site(vit: nn.Module, index: int, path: str) -> Site:
    """The site of ``path`` (``"attn.qkv"``, ``"norm1"``) in block ``index``.

    The path is followed through adapters' wrappers (``attn`` wrapped by a Houlsby adapter still
    leads to its ``qkv``). Raises :class:`UnsupportedModelError` when the block has no such layer.
    """
    block = inner_blocks(vit)[index]
    *parents, attr = path.split(".")
    label = f"blocks.{index}.{path}"
    try:
        parent = block
        for part in parents:
            parent = plain_layer(getattr(parent, part))
        getattr(parent, attr)
    except AttributeError as err:
        raise UnsupportedModelError(
            f"{label} does not exist in this {type(block).__qualname__}; these methods adapt timm ViTs whose "
            "blocks have norm1, attn.qkv, attn.proj, norm2, mlp.fc1 and mlp.fc2"
        ) from err
    return Site(label, parent, attr)


def can_fold_output(module: nn.Module, shift: bool) -> bool:
    """Whether :func:`fold_output` (with a shift or not) can fold into ``module``."""
    if isinstance(module, LayerWrapper):
        return module.absorbs_output(shift)
    return isinstance(module, FOLDABLE)


def _channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def fold_output(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
    """Make ``module`` compute ``scale ⊙ module(x) + shift`` (per output channel), in place.

    ``W ← diag(scale)·W`` and ``b ← scale ⊙ b + shift``, the LayerNorm's affine likewise. A layer
    without a bias gets one when the shift is given: the merged model then has that extra tensor.
    """
    if isinstance(module, LayerWrapper):
        module.absorb_output(scale, shift)
        return
    weight = module.weight
    with torch.no_grad():
        weight.mul_(_channel_view(scale, weight))
        if module.bias is not None:
            module.bias.mul_(scale.to(module.bias.dtype))
            if shift is not None:
                module.bias.add_(shift.to(module.bias.dtype))
        elif shift is not None:
            module.bias = nn.Parameter(shift.detach().to(weight.dtype).clone(), requires_grad=False)


def fold_input(module: nn.Module, scale: torch.Tensor) -> None:
    """Make the ``Linear`` ``module`` compute ``module(scale ⊙ x)``, in place: ``W ← W·diag(scale)``."""
    if isinstance(module, LayerWrapper):
        module.absorb_input(scale)
        return
    with torch.no_grad():
        module.weight.mul_(scale.to(module.weight.dtype).unsqueeze(0))
