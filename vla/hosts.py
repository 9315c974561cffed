"""The model families visionpeft.vla describes to the core (declared as ``visionpeft.hosts``).

open_clip's ``CLIP`` and ``CustomTextCLIP``, for the generic methods: LoRA adapts the MLP layers
of both towers' residual blocks by default (``mlp.c_fc``, ``mlp.c_proj``). The attention output
projection is left out on purpose: ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly
instead of calling the layer, so a LoRA wrapped around it would never run. The prompt learners
(CoOp, CoCoOp, MaPLe) check the model themselves and need no host.
"""

from __future__ import annotations

from torch import nn

from visionpeft.hosts import Host

CLIP_LORA_TARGETS = r"(text\.|visual\.)?transformer\.resblocks\.\d+\.mlp\.(c_fc|c_proj)"


def is_open_clip_model(model: nn.Module) -> bool:
    """Whether ``model`` is an open_clip ``CLIP`` or ``CustomTextCLIP`` (without importing open_clip otherwise)."""
    if not type(model).__module__.startswith("open_clip"):
        return False
    import open_clip

    return isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP))


def _enable_checkpointing(model: nn.Module) -> None:
    model.set_grad_checkpointing(True)


OPEN_CLIP = Host(
    family="open_clip.CLIP",
    matches=is_open_clip_model,
    lora_targets=[CLIP_LORA_TARGETS],
    head=None,
    enable_gradient_checkpointing=_enable_checkpointing,
    frozen_backbone_eval=True,
)

HOSTS = [OPEN_CLIP]
