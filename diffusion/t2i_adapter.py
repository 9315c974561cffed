"""T2I-Adapter (Mou et al., 2023) for diffusers Stable Diffusion: a trained condition encoder, frozen UNet.

A diffusers :class:`~diffusers.T2IAdapter` (``full_adapter``, ``light_adapter`` or
``full_adapter_xl``, the architectures of TencentARC's ``Adapter``, ``Adapter_light`` and
``Adapter_XL``) is registered on the model as the submodule ``t2i_adapter``; through the model's
UNet-input hook the method passes its per-level features to the UNet as
``down_intrablock_additional_residuals`` (a new list each call, since the UNet pops from it), and
through its pipeline hook ``to_pipeline`` builds diffusers' Adapter pipelines. The UNet, VAE and
text encoders stay frozen: unlike diffusers' SDXL script (which leaves the UNet trainable, see
diffusers#5403) only the adapter gets gradients, which the UNet passes through without needing its
own.

The adapter's defaults are read from the UNet: ``channels`` from its ``block_out_channels`` and
``downscale_factor`` from the pixel size of its first residual (the VAE scale factor for SD: 8, and
2 for the tiny test VAE; twice that for SDXL), and attaching checks that every adapter feature has
the channels and resolution of the UNet block it enters, so a mismatch fails at attach instead of
inside the UNet. :func:`export_adapter` writes ``save_pretrained`` output, which
``T2IAdapter.from_pretrained`` and ``StableDiffusionAdapterPipeline`` load, and ComfyUI too for the
default 4-level layout.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from visionpeft import files
from visionpeft.config import MethodConfig, field
from visionpeft.diffusion.base import DiffusionMethod
from visionpeft.errors import AdapterError, ConfigError, DataError
from visionpeft.method import RunInfo, get_state

#: the submodule the adapter is registered under, and the folder it is exported to
ATTR = "t2i_adapter"
EXPORT_DIR = "t2i_adapter"


def find_t2i_adapter(model: nn.Module) -> nn.Module | None:
    """The T2I-Adapter attached to ``model`` (its ``t2i_adapter`` submodule), or ``None``."""
    return model._modules.get(ATTR)


@dataclasses.dataclass
class T2IAdapterConfig(MethodConfig):
    """T2I-Adapter's architecture; ``None`` means "fit the UNet" (see the module docstring)."""

    adapter_type: Literal["full_adapter", "light_adapter", "full_adapter_xl"] = field(
        "full_adapter", help="full_adapter (SD), full_adapter_xl (SDXL) or light_adapter (the colour adapter's)"
    )
    in_channels: int = field(3, help="channels of the condition images: 3 for RGB, 1 for sketch / edges / gray", ge=1)
    channels: list[int] | None = field(
        None, help="feature channels per adapter level; default: the UNet's block_out_channels", ge=1
    )
    num_res_blocks: int = field(2, help="residual blocks per adapter level", ge=1)
    downscale_factor: int | None = field(
        None, help="pixel-unshuffle factor of the condition image; default: the pixel size of the UNet's first "
        "residual (8 for SD, 16 for SDXL)", ge=1,
    )
    adapter_conditioning_scale: float = field(
        1.0, help="multiplies the adapter's features in training and sampling (pass the same value to the "
        "pipeline's adapter_conditioning_scale)", ge=0,
    )


def unet_residual_slots(unet: nn.Module, vae_scale_factor: int) -> list[tuple[int, int]]:
    """``(channels, pixels per feature pixel)`` of each residual the UNet adds, in the order it pops them.

    Read from ``UNet2DConditionModel.forward``: a cross-attention down block adds its residual before
    its downsampler, any other down block after it, and the mid block takes one more when the shape
    matches (SDXL's fourth feature).
    """
    channels = list(unet.config.block_out_channels)
    factor = vae_scale_factor
    slots = []
    for i, block in enumerate(unet.down_blocks):
        downsamples = getattr(block, "downsamplers", None) is not None
        if getattr(block, "has_cross_attention", False):
            slots.append((channels[i], factor))
            factor *= 2 if downsamples else 1
        else:
            factor *= 2 if downsamples else 1
            slots.append((channels[i], factor))
    if getattr(unet, "mid_block", None) is not None:
        slots.append((channels[-1], factor))
    return slots


def adapter_feature_shapes(adapter_kwargs: dict[str, Any]) -> list[tuple[int, int]]:
    """``(channels, pixels per feature pixel)`` of each feature the adapter with these kwargs returns.

    Runs diffusers' own module on the meta device (no memory, no compute), so the answer is
    diffusers' architecture and not a re-derivation of it.
    """
    from diffusers import T2IAdapter

    with torch.device("meta"):
        probe = T2IAdapter(**adapter_kwargs)
        size = probe.total_downscale_factor * 4
        features = probe(torch.empty(1, adapter_kwargs["in_channels"], size, size))
    return [(f.shape[1], size // f.shape[-1]) for f in features]


def _default_channels(adapter_type: str, slots: list[tuple[int, int]], num_down_blocks: int) -> list[int]:
    down = [c for c, _ in slots[:num_down_blocks]]
    if adapter_type == "light_adapter":
        # LightAdapter adds one level that repeats the last channels: SD's [320, 640, 1280] gives 4 features.
        return down[:-1] or down
    if adapter_type == "full_adapter_xl":
        return [c for c, _ in slots]  # three down blocks and the mid block
    return down


class T2IAdapterMethod(DiffusionMethod):
    """A trained diffusers T2IAdapter whose features enter the frozen UNet's down blocks."""

    name = "t2i_adapter"
    description = "T2I-Adapter for Stable Diffusion: a diffusers T2IAdapter trains, the UNet stays frozen"
    Config = T2IAdapterConfig
    mergeable = False
    freezes_base = True
    starts_as_identity = False
    takes_conditions = True

    def __init__(self, config: MethodConfig, adapter_name: str = "default") -> None:
        super().__init__(config, adapter_name)
        self._handles: list[Any] = []
        self.adapter_kwargs: dict[str, Any] = {}

    def resolve(self, model: nn.Module) -> dict[str, Any]:
        """The ``T2IAdapter`` constructor arguments for ``model``, checked against its UNet.

        Raises :class:`ConfigError` naming the adapter features that would not fit the UNet.
        """
        cfg = self.config
        slots = unet_residual_slots(model.unet, model.vae_scale_factor)
        num_down = len(model.unet.down_blocks)
        if cfg.channels is not None:
            channels = list(cfg.channels)
        else:
            channels = _default_channels(cfg.adapter_type, slots, num_down)
        kwargs = {
            "in_channels": cfg.in_channels,
            "channels": channels,
            "num_res_blocks": cfg.num_res_blocks,
            "downscale_factor": cfg.downscale_factor if cfg.downscale_factor is not None else slots[0][1],
            "adapter_type": cfg.adapter_type,
        }
        if cfg.adapter_type == "light_adapter" and any(c % 4 for c in channels):
            raise ConfigError(
                f"t2i_adapter.channels: light_adapter needs multiples of 4 (it works at c/4), got {channels}"
            )
        try:
            features = adapter_feature_shapes(kwargs)
        except (RuntimeError, ValueError, IndexError) as err:
            raise ConfigError(f"t2i_adapter: diffusers cannot build a T2IAdapter with {kwargs} ({err})") from err
        if len(features) > len(slots) or any(f != s for f, s in zip(features, slots, strict=False)):
            def show(items: list[tuple[int, int]]) -> str:
                return ", ".join(f"{c}ch@1/{f}" for c, f in items)

            raise ConfigError(
                f"t2i_adapter: the {cfg.adapter_type} with channels {channels} and downscale_factor "
                f"{kwargs['downscale_factor']} gives features [{show(features)}] (channels @ image scale), but this "
                f"UNet takes residuals [{show(slots)}] in that order; use the defaults (channels and downscale_factor "
                "unset), full_adapter for SD 1.x/2.x or full_adapter_xl for SDXL"
            )
        return kwargs

    def attach(self, model: nn.Module) -> nn.Module:
        from diffusers import T2IAdapter

        if find_t2i_adapter(model) is not None:
            raise AdapterError("a T2I-Adapter is already attached to this model; vp.detach it first (one per model)")
        self.adapter_kwargs = self.resolve(model)
        like = next(model.unet.parameters())
        adapter = T2IAdapter(**self.adapter_kwargs).to(like.device)
        if like.dtype not in (torch.float16, torch.bfloat16, adapter.dtype):
            adapter = adapter.to(like.dtype)  # e.g. a float64 model in tests; half precision stays fp32
        adapter.requires_grad_(True)
        # The pipeline first: it is the one registration that can be refused (another method chose the
        # model's pipeline), and then nothing on the model has changed.
        self._handles = [model.register_pipeline(lambda parts, sdxl: self._pipeline(adapter, parts, sdxl))]
        self._handles.append(adapter.register_forward_pre_hook(self._check_condition))
        if self.config.adapter_conditioning_scale != 1.0:
            self._handles.append(adapter.register_forward_hook(self._scale))
        model.add_module(ATTR, adapter)
        self._handles.append(model.register_unet_inputs(lambda call: self._residuals(adapter, call)))
        return model

    @staticmethod
    def _residuals(adapter: nn.Module, call: Any) -> dict[str, Any]:
        """The adapter's features for the UNet's down blocks, a new list per call (the UNet pops from it)."""
        if call.condition is None:
            raise ConfigError(
                "this model has a T2I-Adapter attached, so every forward needs condition= (the condition "
                "images as a (B, C, H, W) tensor in [0, 1]); the data must provide condition images"
            )
        adapter_dtype = next(adapter.parameters()).dtype
        features = adapter(call.condition.to(call.noisy_latents.device, adapter_dtype))
        return {"down_intrablock_additional_residuals": [f.to(call.dtype) for f in features]}

    @staticmethod
    def _pipeline(adapter: nn.Module, components: dict[str, Any], sdxl: bool) -> Any:
        import diffusers

        pipeline = diffusers.StableDiffusionXLAdapterPipeline if sdxl else diffusers.StableDiffusionAdapterPipeline
        return pipeline(adapter=adapter, **components)

    def condition_channels(self, model: nn.Module) -> int | None:
        return self.adapter_kwargs.get("in_channels", self.config.in_channels)

    def export(self, model: nn.Module, output_dir: str | os.PathLike, run: RunInfo) -> None:
        """The adapter's ``save_pretrained`` folder, ``t2i_adapter/`` (see :func:`export_adapter`)."""
        export_adapter(model, output_dir)

    def _check_condition(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        kwargs = self.adapter_kwargs
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"the T2I-Adapter takes condition images as a (B, C, H, W) tensor in [0, 1], got {shape}")
        if x.shape[1] != kwargs["in_channels"]:
            hint = "gray / L-mode images" if kwargs["in_channels"] == 1 else f"{kwargs['in_channels']}-channel images"
            raise DataError(
                f"the condition images have {x.shape[1]} channels but this T2I-Adapter takes in_channels="
                f"{kwargs['in_channels']}: give {hint}, or attach the adapter with in_channels={x.shape[1]}"
            )
        factor = kwargs["downscale_factor"]
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise DataError(
                f"condition images of {x.shape[-2]}x{x.shape[-1]} px are not divisible by the T2I-Adapter's "
                f"downscale_factor {factor}; resize them (and the training images) to a multiple of {factor}"
            )

    def _scale(self, module: nn.Module, args: tuple[Any, ...], output: list[torch.Tensor]) -> list[torch.Tensor]:
        scale = self.config.adapter_conditioning_scale
        return [feature * scale for feature in output]

    def detach(self, model: nn.Module) -> nn.Module:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if ATTR in model._modules:
            del model._modules[ATTR]
        return model

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        adapter = model._modules.get(ATTR)
        return {} if adapter is None else dict(adapter.named_parameters())

    def train_modules(self, model: nn.Module) -> list[nn.Module] | None:
        adapter = model._modules.get(ATTR)
        return [] if adapter is None else [adapter]


def export_adapter(model: nn.Module, output_dir: str | os.PathLike) -> Path:
    """Save the attached T2I-Adapter with ``save_pretrained`` into ``output_dir / "t2i_adapter"``.

    The folder (``config.json``, ``diffusion_pytorch_model.safetensors``) is replaced whole
    (:func:`visionpeft.files.replace_folder`), so a crash leaves the previous export intact.
    Returns the folder.
    """
    state = get_state(model)
    if state is None or not any(isinstance(a.method, T2IAdapterMethod) for a in state.adapters.values()):
        raise AdapterError("no t2i_adapter is attached to this model; vp.attach(model, 't2i_adapter') first")
    adapter = model._modules[ATTR]
    return files.replace_folder(
        Path(output_dir) / EXPORT_DIR, lambda folder: adapter.save_pretrained(folder, safe_serialization=True)
    )
