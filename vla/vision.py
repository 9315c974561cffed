"""The image tower of an open_clip ViT with vision prompts appended to its tokens (MaPLe).

:func:`encode_image_with_prompts` follows ``open_clip.transformer.VisionTransformer.forward``
(patch embedding, class token, positional embedding, ``ln_pre``, the blocks, pooling, ``proj``)
with MaPLe's two changes: the layer-0 prompts are appended after the patch tokens, after the
positional embedding and before ``ln_pre``; before blocks ``1..len(deep)`` the last ``n`` tokens
are replaced by the deeper prompts. With no prompts it equals ``model.visual(images)`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from visionpeft.errors import UnsupportedModelError
from visionpeft.vla.text import run_block


def vision_transformer(model: nn.Module) -> nn.Module:
    """The open_clip ``VisionTransformer`` image tower of ``model``; other towers are an error."""
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(
            f"MaPLe needs an open_clip ViT image tower, but this model's is {type(visual).__qualname__}; use a ViT "
            "CLIP (e.g. ViT-B-16), or CoOp / CoCoOp, which work with any image tower"
        )
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedModelError(
            "MaPLe reads the class token of the image tower; this ViT pools otherwise (attentional or average "
            "pooling), which would pool the prompts too"
        )
    return visual


def vision_width(model: nn.Module) -> int:
    """The token width of the ViT image tower (768 for ViT-B/16)."""
    return vision_transformer(model).conv1.out_channels


def encode_image_with_prompts(
    visual: nn.Module,
    images: torch.Tensor,
    prompts: torch.Tensor | None = None,
    deep_prompts: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Image features of ``images`` with ``prompts`` ``(n, width)`` appended, and ``deep_prompts``.

    Patch dropout is applied (in training, when configured) before the prompts are appended, so
    it never drops a prompt. Returns ``(B, embed_dim)``, not normalised.
    """
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    n = 0
    if prompts is not None:
        n = prompts.shape[0]
        x = torch.cat([x, prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    transformer = visual.transformer
    if not deep_prompts:
        x = transformer(x)
    else:
        if n == 0:
            raise ValueError("deep vision prompts need layer-0 prompts to replace")
        batch_first = getattr(transformer, "batch_first", True)
        for i, block in enumerate(transformer.resblocks):
            if 1 <= i <= len(deep_prompts):
                deep = deep_prompts[i - 1].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :-n], deep], dim=1)
            x = run_block(transformer, block, x if batch_first else x.transpose(0, 1), None)
            x = x if batch_first else x.transpose(0, 1)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled
