"""The model family visionpeft.diffusion describes to the core (declared as ``visionpeft.hosts``).

A :class:`~visionpeft.diffusion.models.StableDiffusionModel` is one host: LoRA adapts the UNet's
attention projections by default (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, as diffusers' and
kohya's scripts do), and the presets below let a run add other layer groups by name:

* ``@unet_attn``: the default, the attention projections of every transformer block;
* ``@unet_ff``: the feed-forward layers (``ff.net.0.proj``, ``ff.net.2``);
* ``@unet_conv``: the convolutions (resnets' ``conv1`` / ``conv2`` / ``conv_shortcut``, the down-
  and upsamplers, and ``proj_in`` / ``proj_out``: 1x1 convolutions in SD 1.x, linear in SD 2.x and
  SDXL), kohya's LoCon set;
* ``@text_encoder``: the self-attention projections (``q_proj``, ``k_proj``, ``v_proj``,
  ``out_proj``) of the text encoder(s), as diffusers' ``--train_text_encoder``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from visionpeft.hosts import Host

UNET_ATTN = r"unet\.(down_blocks|mid_block|up_blocks)\..+\.attn\d\.(to_q|to_k|to_v|to_out\.0)"
UNET_FF = r"unet\.(down_blocks|mid_block|up_blocks)\..+\.ff\.net\.(0\.proj|2)"
UNET_CONV = (
    r"unet\.(down_blocks|mid_block|up_blocks)\.(\d+\.)?resnets\.\d+\.(conv1|conv2|conv_shortcut)",
    r"unet\.(down_blocks|up_blocks)\.\d+\.(downsamplers|upsamplers)\.0\.conv",
    r"unet\.(down_blocks|mid_block|up_blocks)\.(\d+\.)?attentions\.\d+\.(proj_in|proj_out)",
)
TEXT_ENCODER = r"text_encoder(_2)?\.(text_model\.)?encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"

PRESETS: dict[str, list[str]] = {
    "unet_attn": [UNET_ATTN],
    "unet_ff": [UNET_FF],
    "unet_conv": list(UNET_CONV),
    "text_encoder": [TEXT_ENCODER],
}


def is_stable_diffusion(model: nn.Module) -> bool:
    """Whether ``model`` is a :class:`~visionpeft.diffusion.models.StableDiffusionModel`."""
    from visionpeft.diffusion.models import StableDiffusionModel

    return isinstance(model, StableDiffusionModel)


def _enable_checkpointing(model: nn.Module) -> None:
    # The text encoders run under checkpointing only when something in them trains (a text-encoder
    # LoRA, textual inversion's rows), as diffusers' scripts do with --train_text_encoder.
    model.unet.enable_gradient_checkpointing()
    for encoder in (model.text_encoder, model.text_encoder_2):
        if encoder is not None and any(p.requires_grad for p in encoder.parameters()):
            encoder.gradient_checkpointing_enable()


def _export_lora(model: nn.Module, output_dir: Any, run: Any, adapter_name: str) -> None:
    """LoRA ``adapter_name`` in diffusers' and kohya's formats, the kohya file with the run's ``ss_*`` metadata."""
    from visionpeft.diffusion.lora_export import export_lora

    metadata = {"ss_output_name": Path(output_dir).name}
    config = run.config
    if config is not None:
        metadata["ss_sd_model_name"] = str(config.model.checkpoint or config.model.name)
        resolution = getattr(config.data, "resolution", None)
        if resolution is not None:
            metadata["ss_resolution"] = f"({resolution}, {resolution})"
    export_lora(model, output_dir, adapter_name, **metadata)


STABLE_DIFFUSION = Host(
    family="diffusers.StableDiffusion",
    matches=is_stable_diffusion,
    lora_targets=[UNET_ATTN],
    head=None,
    enable_gradient_checkpointing=_enable_checkpointing,
    frozen_backbone_eval=True,
    target_presets=PRESETS,
    untrained=("vae",),
    lora_export=_export_lora,
)

HOSTS = [STABLE_DIFFUSION]
