"""The model families visionpeft.vit describes to the core (declared as ``visionpeft.hosts``).

The generic methods (``lora``, ``bitfit``) read from these hosts which layers a LoRA adapts and
where the head is. Targets are matched by full names, so ``patch_embed.proj`` is never caught;
``(block\\.)?`` follows blocks that another adapter wrapped in an ``AdaptedBlock``.
"""

from __future__ import annotations

from torch import nn

from visionpeft.hosts import Host
from visionpeft.vit.surface import is_timm_vit

VIT_LORA_TARGETS = r"blocks\.\d+\.(block\.)?(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def _enable_checkpointing(model: nn.Module) -> None:
    from visionpeft.vit.surface import find_vit

    find_vit(model).set_grad_checkpointing(True)


def _is_video_classifier(model: nn.Module) -> bool:
    from visionpeft.vit.video import VideoClassifier

    return isinstance(model, VideoClassifier)


TIMM_VIT = Host(
    family="timm.VisionTransformer",
    matches=is_timm_vit,
    lora_targets=[VIT_LORA_TARGETS],
    head="head",
    enable_gradient_checkpointing=_enable_checkpointing,
    frozen_backbone_eval=True,
)

VIDEO_VIT = Host(
    family="visionpeft.vit.VideoClassifier",
    matches=_is_video_classifier,
    lora_targets=["vit\\." + VIT_LORA_TARGETS],
    head="vit.head",
    enable_gradient_checkpointing=_enable_checkpointing,
    frozen_backbone_eval=True,
)

HOSTS = [TIMM_VIT, VIDEO_VIT]
