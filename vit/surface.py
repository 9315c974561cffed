"""The surface: everything visionpeft knows of timm's ``VisionTransformer``, in one place.

Methods ask this module where prompts enter, where a parallel branch goes and where the head
reads, instead of touching timm internals each on its own:

* :func:`find_vit` finds the timm ViT in a model (itself, or the backbone of a
  :class:`~visionpeft.vit.video.VideoClassifier`).
* :class:`AdaptedBlock` wraps a timm ``Block`` with three insertion points: ``before_attn`` and
  ``before_mlp`` transform the residual stream (ST-Adapter), ``beside_mlp`` adds a branch in
  parallel with the MLP that reads the post-attention residual (AdaptFormer).
* Extra tokens (VPT prompts) sit right after the prefix (class and register) tokens; methods that
  add them declare how many with :func:`set_extra_tokens`, and :func:`drop_extra_tokens` removes
  them before pooling, so class-token and average-pooled heads read only what they read without.
* :func:`encode_frames` runs the blocks without the final norm, for the temporal head.

timm is imported only inside functions: importing this module stays cheap.
"""

from __future__ import annotations

import torch
from torch import nn

from visionpeft.errors import UnsupportedModelError
from visionpeft.inject import replace_module

EXTRA_TOKENS_ATTR = "_visionpeft_extra_tokens"
SUPPORTED = "timm VisionTransformer (ViT, DeiT, CLIP ViTs, register-token and average-pooled variants)"


def is_timm_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``VisionTransformer`` (or a subclass)."""
    if not type(model).__module__.startswith("timm."):
        return False
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def find_vit(model: nn.Module) -> nn.Module:
    """The timm ViT inside ``model``: the model itself or its ``vit`` attribute (video)."""
    if is_timm_vit(model):
        return model
    inner = getattr(model, "vit", None)
    if isinstance(inner, nn.Module) and is_timm_vit(inner):
        return inner
    raise UnsupportedModelError(
        f"{type(model).__module__}.{type(model).__qualname__} is not supported; visionpeft.vit adapts {SUPPORTED}. "
        "Swin, ConvNeXt and other families have a different block structure."
    )


def vit_prefix(model: nn.Module) -> str:
    """The qualified-name prefix of the ViT inside ``model`` (``""`` or ``"vit."``)."""
    return "" if is_timm_vit(model) else "vit."


def check_blocks(vit: nn.Module) -> None:
    """Refuse models whose blocks are not timm's standard pre-norm ``Block``.

    :class:`AdaptedBlock` re-states ``Block.forward``; a subclass with another forward (parallel
    blocks, post-norm blocks) would silently compute something else.
    """
    from timm.models.vision_transformer import Block

    for i, block in enumerate(vit.blocks):
        inner = block.block if isinstance(block, AdaptedBlock) else block
        if not isinstance(inner, Block) or type(inner).forward is not Block.forward:
            raise UnsupportedModelError(
                f"blocks.{i} is a {type(inner).__qualname__}, not timm's pre-norm Block; this method supports "
                f"{SUPPORTED} with standard blocks"
            )


class AdaptedBlock(nn.Module):
    """A timm ``Block`` with insertion points for adapters, keyed by adapter name.

    The forward is ``Block.forward`` with the insertions; with none it computes exactly what the
    wrapped block computes. ``beside_mlp`` modules receive the post-attention residual ``x`` (not
    ``norm2(x)``) and their output is added outside drop-path and LayerScale, as AdaptFormer does.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.before_attn = nn.ModuleDict()
        self.before_mlp = nn.ModuleDict()
        self.beside_mlp = nn.ModuleDict()

    def is_empty(self) -> bool:
        """Whether no adapter is inserted any more."""
        return not (self.before_attn or self.before_mlp or self.beside_mlp)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b = self.block
        for module in self.before_attn.values():
            x = module(x)
        attn_kwargs = {"attn_mask": attn_mask}
        if is_causal:
            attn_kwargs["is_causal"] = True
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x), **attn_kwargs)))
        for module in self.before_mlp.values():
            x = module(x)
        out = x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))
        for module in self.beside_mlp.values():
            out = out + module(x)
        return out


_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _swap_hooks(a: nn.Module, b: nn.Module) -> None:
    # AdaptedBlock calls the inner block's parts, not the block itself, so hooks that other adapters
    # put on the block (VPT's deep prompts) must move to whatever sits at its place in `blocks`. The
    # dicts move whole, so the hooks' handles still remove them.
    for name in _HOOK_DICTS:
        first, second = getattr(a, name), getattr(b, name)
        setattr(a, name, second)
        setattr(b, name, first)


def adapted_block(model: nn.Module, index: int) -> AdaptedBlock:
    """The :class:`AdaptedBlock` at ``blocks[index]`` of the ViT in ``model``, wrapping it if needed.

    Forward hooks registered on the block move to the wrapper, so they keep running at the
    block's place in the sequence.
    """
    vit = find_vit(model)
    block = vit.blocks[index]
    if isinstance(block, AdaptedBlock):
        return block
    wrapper = AdaptedBlock(block)
    _swap_hooks(block, wrapper)
    replace_module(vit, f"blocks.{index}", wrapper)
    return wrapper


def release_block(model: nn.Module, index: int) -> None:
    """Unwrap ``blocks[index]`` when no adapter is inserted in it any more (its hooks move back)."""
    vit = find_vit(model)
    block = vit.blocks[index]
    if isinstance(block, AdaptedBlock) and block.is_empty():
        replace_module(vit, f"blocks.{index}", block.block)
        _swap_hooks(block, block.block)


def set_extra_tokens(vit: nn.Module, owner: str, count: int) -> None:
    """Declare (``count`` > 0) or withdraw (0) the extra tokens ``owner`` inserts after the prefix."""
    table = vit.__dict__.setdefault(EXTRA_TOKENS_ATTR, {})
    if count:
        table[owner] = count
    else:
        table.pop(owner, None)
        if not table:
            vit.__dict__.pop(EXTRA_TOKENS_ATTR, None)


def num_extra_tokens(vit: nn.Module) -> int:
    """How many extra tokens follow the prefix tokens."""
    return sum(vit.__dict__.get(EXTRA_TOKENS_ATTR, {}).values())


def drop_extra_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Remove the extra tokens from a ``(B, N, D)`` token tensor, keeping prefix and patch tokens."""
    extra = num_extra_tokens(vit)
    if not extra:
        return x
    start = vit.num_prefix_tokens
    return torch.cat([x[:, :start], x[:, start + extra :]], dim=1)


def encode_frames(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Tokens after the last block, before the final norm, for a batch of images ``(N, C, H, W)``.

    The same steps as timm's ``forward_features`` minus ``norm``, with gradient checkpointing
    honoured; the temporal head pools these per frame before normalising.
    """
    from timm.models._manipulate import checkpoint_seq

    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    if vit.grad_checkpointing and not torch.jit.is_scripting():
        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    return drop_extra_tokens(vit, x)


def pool_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ViT's own pooling of ``(N, T, D)`` tokens (class token or average), before any norm."""
    if getattr(vit, "attn_pool", None) is not None:
        raise UnsupportedModelError("attention-pooled ViTs (global_pool='map') are not supported for video")
    return vit.pool(x)


def patch_size(vit: nn.Module) -> tuple[int, int]:
    """The patch height and width of the ViT's patch embedding."""
    size = vit.patch_embed.patch_size
    return (size, size) if isinstance(size, int) else tuple(size)


def every_block(model: nn.Module, layers: int | None) -> list[int]:
    """Indices of the last ``layers`` blocks (all when ``None``), as ST-Adapter selects them."""
    depth = len(find_vit(model).blocks)
    if layers is None or layers >= depth:
        return list(range(depth))
    return list(range(depth - layers, depth))

