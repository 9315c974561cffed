"""Video classification with an image ViT: frames folded into the batch, a temporal head.

:class:`VideoClassifier` is what ST-Adapter's original model does around CLIP's ViT: each frame
goes through the backbone as an image, the per-frame pooled features (the class token, or the
average of patch tokens) are averaged over time *before* the final norm, then the head classifies.
"""

from __future__ import annotations

import torch
from torch import nn

from visionpeft.errors import ConfigError
from visionpeft.vit.surface import encode_frames, find_vit, pool_tokens


class VideoClassifier(nn.Module):
    """A timm ViT applied to clips ``(B, T, C, H, W)`` with ``T == num_frames``."""

    def __init__(self, vit: nn.Module, num_frames: int) -> None:
        super().__init__()
        find_vit(vit)  # refuses anything that is not a timm ViT
        if num_frames < 1:
            raise ConfigError(f"num_frames: {num_frames} must be >= 1")
        self.vit = vit
        self.num_frames = num_frames

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() != 5 or video.shape[1] != self.num_frames:
            raise ValueError(
                f"expected clips of shape (B, {self.num_frames}, C, H, W), got {tuple(video.shape)}; "
                "sample num_frames frames per clip"
            )
        b, t = video.shape[:2]
        tokens = encode_frames(self.vit, video.flatten(0, 1))
        pooled = pool_tokens(self.vit, tokens).view(b, t, -1).mean(dim=1)
        x = self.vit.fc_norm(self.vit.norm(pooled))
        return self.vit.head(self.vit.head_drop(x))
