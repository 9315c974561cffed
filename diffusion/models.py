"""The Stable Diffusion model container: the trainable parts of a diffusers pipeline as one module.

Every diffusion method adapts a :class:`StableDiffusionModel`: LoRA wraps the UNet's (and the text
encoders') projections, textual inversion adds token rows to the text encoder(s). A method that
feeds the UNet something of its own (a control network's residuals) does it through two hooks the
container offers and never interprets: :meth:`StableDiffusionModel.register_unet_inputs` (extra UNet
keyword arguments per forward) and :meth:`StableDiffusionModel.register_pipeline` (which diffusers
pipeline :meth:`~StableDiffusionModel.to_pipeline` builds). The container knows no method. It
encodes prompts as diffusers' pipelines do, so training sees the same conditioning as inference,
and :meth:`StableDiffusionModel.to_pipeline` gives back a pipeline that shares these very modules.

SD 1.x / 2.x and SDXL are supported; loading reads a diffusers folder, a hub id (from the local
cache unless the hub is reachable) or a single ``.safetensors`` / ``.ckpt`` file.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from visionpeft.errors import ConfigError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


@dataclass(frozen=True)
class UNetCall:
    """What a UNet-input hook sees of one forward of :class:`StableDiffusionModel`.

    ``condition`` is the batch's condition images (``(B, C, H, W)`` in [0, 1]) or ``None``;
    ``dtype`` the UNet's. The hook returns extra keyword arguments for the UNet's forward.
    """

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    encoder_hidden_states: torch.Tensor
    condition: torch.Tensor | None
    dtype: torch.dtype


#: ``hook(call) -> {UNet keyword: value}``, see :meth:`StableDiffusionModel.register_unet_inputs`
UNetInputHook = Callable[[UNetCall], dict[str, Any]]
#: ``factory(components, is_sdxl) -> pipeline``, see :meth:`StableDiffusionModel.register_pipeline`
PipelineFactory = Callable[[dict[str, Any], bool], Any]


class StableDiffusionModel(nn.Module):
    """UNet, VAE and text encoder(s) of a Stable Diffusion pipeline, with its tokenizers and schedulers.

    Submodules: ``unet``, ``vae``, ``text_encoder`` and, for SDXL, ``text_encoder_2`` (``None``
    otherwise). Plain attributes: ``tokenizer``, ``tokenizer_2``, ``noise_scheduler`` (the
    ``DDPMScheduler`` used for training, built from the pipeline scheduler's config, so the beta
    schedule and ``prediction_type`` are the checkpoint's), ``scheduler`` (the pipeline's inference
    scheduler) and ``is_sdxl``. The VAE and text encoders are frozen and in eval mode; methods that
    train one of them unfreeze what they train.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler: Any,
        *,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any = None,
        noise_scheduler: Any = None,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.noise_scheduler = noise_scheduler if noise_scheduler is not None else DDPMScheduler.from_config(
            scheduler.config
        )
        self.is_sdxl = text_encoder_2 is not None or getattr(unet.config, "addition_embed_type", None) == "text_time"
        if self.is_sdxl and (text_encoder_2 is None or tokenizer_2 is None):
            raise ConfigError(
                "an SDXL UNet (addition_embed_type 'text_time') needs both text encoders and tokenizers; "
                "load the full SDXL base pipeline (refiner-only checkpoints are not supported)"
            )
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        # OrderedDicts, as torch's own hook tables: RemovableHandle keeps a weak reference to them.
        self._unet_input_hooks: OrderedDict[int, UNetInputHook] = OrderedDict()
        self._pipeline_factories: OrderedDict[int, PipelineFactory] = OrderedDict()
        for frozen in (vae, text_encoder, text_encoder_2):
            if frozen is not None:
                frozen.requires_grad_(False)
                frozen.eval()

    # -- construction --

    @classmethod
    def from_pipeline(cls, pipe: Any) -> StableDiffusionModel:
        """The container of a diffusers SD 1.x/2.x or SDXL pipeline.

        It shares the pipeline's modules (no copies), so the pipeline's VAE and text encoders are
        frozen and put in eval mode too.
        """
        components = getattr(pipe, "components", {})
        for required in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if components.get(required) is None:
                raise ConfigError(
                    f"the pipeline {type(pipe).__name__} has no {required!r}; visionpeft.diffusion adapts Stable "
                    "Diffusion 1.x/2.x and SDXL pipelines (UNet, VAE, CLIP text encoder(s), tokenizer(s))"
                )
        config = getattr(pipe, "config", {})
        return cls(
            components["unet"],
            components["vae"],
            components["text_encoder"],
            components["tokenizer"],
            components["scheduler"],
            text_encoder_2=components.get("text_encoder_2"),
            tokenizer_2=components.get("tokenizer_2"),
            force_zeros_for_empty_prompt=bool(config.get("force_zeros_for_empty_prompt", True)),
        )

    # -- properties --

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent pixel covers (8 for SD, 2 for the tiny test VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` (the scheduler's config)."""
        return self.noise_scheduler.config.prediction_type

    # -- what methods add --

    def register_unet_inputs(self, hook: UNetInputHook) -> RemovableHandle:
        """Call ``hook`` on every forward and pass what it returns to the UNet as keyword arguments.

        This is how a method feeds the UNet something of its own (a T2I-Adapter's
        ``down_intrablock_additional_residuals``) without the container knowing the method. Hooks
        run in registration order; ``handle.remove()`` unregisters (a method's ``detach``).
        """
        handle = RemovableHandle(self._unet_input_hooks)
        self._unet_input_hooks[handle.id] = hook
        return handle

    def register_pipeline(self, factory: PipelineFactory) -> RemovableHandle:
        """Build :meth:`to_pipeline`'s pipeline with ``factory(components, is_sdxl)`` while registered.

        ``components`` are the keyword arguments every pipeline of the family takes (the shared
        modules, no safety checker, no feature extractor); a method whose inference
        needs another pipeline class (an Adapter pipeline) adds its own module to them. One
        factory at a time: a second is an error until the first is removed.
        """
        if self._pipeline_factories:
            raise ConfigError("another method already chose this model's pipeline (e.g. a second control adapter); "
                              "vp.detach it first")
        handle = RemovableHandle(self._pipeline_factories)
        self._pipeline_factories[handle.id] = factory
        return handle

    # -- text --

    def tokenize(self, prompts: str | list[str]) -> dict[str, torch.Tensor]:
        """Token ids of ``prompts`` padded (and truncated) to each tokenizer's max length.

        Returns ``{"input_ids"}`` and, for SDXL, ``"input_ids_2"`` from the second tokenizer, as
        the pipelines tokenize: a multi-vector textual-inversion token ``<tok>`` is first spelled
        out as ``<tok> <tok>_1 ...`` (diffusers' ``maybe_convert_prompt``), so training sees the
        prompts inference sees.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        out = {"input_ids": _tokenize(self.tokenizer, prompts)}
        if self.tokenizer_2 is not None:
            out["input_ids_2"] = _tokenize(self.tokenizer_2, prompts)
        return out

    def encode_prompt(
        self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's cross-attention states for token ids, and SDXL's pooled text embedding.

        SD 1.x/2.x: the text encoder's last hidden state, and ``None``. SDXL (as
        ``StableDiffusionXLPipeline.encode_prompt``): the penultimate hidden states of both
        encoders concatenated on the feature axis, and the projected pooled output of encoder 2.
        """
        if not self.is_sdxl:
            return self.text_encoder(input_ids.to(self._device_of(self.text_encoder)))[0], None
        if input_ids_2 is None:
            raise ConfigError("SDXL needs input_ids_2 from the second tokenizer (model.tokenize gives both)")
        states = []
        pooled = None
        for encoder, ids in ((self.text_encoder, input_ids), (self.text_encoder_2, input_ids_2)):
            out = encoder(ids.to(self._device_of(encoder)), output_hidden_states=True)
            pooled = out[0]
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1), pooled

    def add_time_ids(
        self,
        batch_size: int,
        target_size: tuple[int, int],
        original_size: tuple[int, int] | None = None,
        crop_top_left: tuple[int, int] = (0, 0),
    ) -> torch.Tensor:
        """SDXL's micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` per sample."""
        original_size = tuple(original_size) if original_size is not None else tuple(target_size)
        ids = torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=torch.float32)
        return ids.repeat(batch_size, 1)

    # -- forward --

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        input_ids: torch.Tensor,
        input_ids_2: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction (``.sample``) for noisy latents at ``timesteps`` under the prompts' ids.

        For SDXL, ``added_cond_kwargs`` entries that are not given are filled: ``text_embeds`` with
        the pooled prompt embedding, ``time_ids`` from the latents' resolution (no crop).
        ``condition`` (``(B, C, H, W)`` in [0, 1]) goes to the hooks of
        :meth:`register_unet_inputs`, which add their UNet arguments; without a hook it is unused.
        """
        dtype = self.unet.dtype
        hidden, pooled = self.encode_prompt(input_ids, input_ids_2)
        kwargs: dict[str, Any] = {}
        if self.is_sdxl:
            added = dict(added_cond_kwargs or {})
            if "text_embeds" not in added:
                added["text_embeds"] = pooled
            if "time_ids" not in added:
                scale = self.vae_scale_factor
                size = (noisy_latents.shape[-2] * scale, noisy_latents.shape[-1] * scale)
                added["time_ids"] = self.add_time_ids(noisy_latents.shape[0], size)
            kwargs["added_cond_kwargs"] = {k: v.to(noisy_latents.device, dtype) for k, v in added.items()}
        elif added_cond_kwargs:
            kwargs["added_cond_kwargs"] = added_cond_kwargs
        hidden = hidden.to(dtype)
        if self._unet_input_hooks:
            call = UNetCall(noisy_latents, timesteps, hidden, condition, dtype)
            for hook in list(self._unet_input_hooks.values()):
                extra = hook(call)
                taken = sorted(set(extra) & set(kwargs))
                if taken:
                    raise ConfigError(f"two attached methods both set the UNet's {taken}; attach only one of them")
                kwargs.update(extra)
        return self.unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=hidden, **kwargs).sample

    # -- latents --

    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents of images in [-1, 1]: a sample of the VAE posterior, times the VAE's scaling factor."""
        posterior = vae_posterior(self.vae, pixel_values)
        return posterior.sample(generator=generator) * self.vae.config.scaling_factor

    # -- pipelines --

    def to_pipeline(self) -> Any:
        """A diffusers pipeline over these very modules (no copies), safety checker and progress bar off.

        ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``, or what a method's factory
        (:meth:`register_pipeline`) builds from the same components. Training changes made later
        show up in the pipeline.
        """
        import diffusers

        common: dict[str, Any] = {
            "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer, "unet": self.unet,
            "scheduler": self.scheduler, "feature_extractor": None,
        }
        if self.is_sdxl:
            common.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                          force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, image_encoder=None)
        else:
            common.update(safety_checker=None, requires_safety_checker=False)
        factories = list(self._pipeline_factories.values())
        if factories:
            pipe = factories[0](common, self.is_sdxl)
        elif self.is_sdxl:
            pipe = diffusers.StableDiffusionXLPipeline(add_watermarker=False, **common)
        else:
            pipe = diffusers.StableDiffusionPipeline(image_encoder=None, **common)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @staticmethod
    def _device_of(module: nn.Module) -> torch.device:
        param = next(module.parameters(), None)
        return param.device if param is not None else torch.device("cpu")


def vae_posterior(vae: nn.Module, pixel_values: torch.Tensor) -> Any:
    """The VAE posterior (``latent_dist``) of images in [-1, 1], encoded without gradients.

    A float16 VAE whose config sets ``force_upcast`` (SDXL's overflows in float16) encodes in
    float32, as diffusers' pipelines do, and is cast back afterwards; the posterior is then float32.
    """
    device = StableDiffusionModel._device_of(vae)
    dtype = vae.dtype
    with torch.no_grad():
        if dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
            return vae.encode(pixel_values.to(device, dtype)).latent_dist
        # .float() / .half(), not .to(dtype): diffusers' ModelMixin.to warns on every dtype cast.
        vae.float()
        try:
            return vae.encode(pixel_values.to(device, torch.float32)).latent_dist
        finally:
            vae.half()


def _tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    prompts = TextualInversionLoaderMixin().maybe_convert_prompt(list(prompts), tokenizer)
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_sd_model(
    name_or_path: str | os.PathLike,
    *,
    single_file: bool | None = None,
    torch_dtype: torch.dtype | str | None = None,
    variant: str | None = None,
    **kwargs: Any,
) -> StableDiffusionModel:
    """Load a Stable Diffusion 1.x/2.x or SDXL pipeline into a :class:`StableDiffusionModel`.

    Args:
        name_or_path: a diffusers pipeline folder, a hub id (read from the local cache when
            ``HF_HUB_OFFLINE`` is set) or a single ``.safetensors`` / ``.ckpt`` checkpoint.
        single_file: force (``True``) or forbid (``False``) single-file loading; by default a
            file path is a single-file checkpoint and anything else a diffusers folder or hub id.
        torch_dtype: dtype of the loaded weights (``"float16"``, ``torch.bfloat16``, ...); the
            trainer keeps the tensors it trains in fp32.
        variant: the weights variant of a diffusers folder (``"fp16"``).
        kwargs: passed to ``from_pretrained`` / ``from_single_file`` (e.g. ``config=`` a local
            diffusers folder describing a single-file checkpoint's architecture, for offline use);
            ``sdxl=True`` reads a single file as SDXL without trying SD 1.x/2.x first.

    Raises :class:`ConfigError` for a missing path, a file that is not a checkpoint, or a
    pipeline that is not Stable Diffusion.
    """
    import diffusers

    dtype = _dtype(torch_dtype)
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    as_file = path.suffix.lower() in SINGLE_FILE_SUFFIXES if single_file is None else single_file
    if as_file:
        if not path.is_file():
            raise ConfigError(f"model.name: the single-file checkpoint {path} does not exist")
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ConfigError(
                f"model.name: {path} is not a checkpoint file (expected one of {list(SINGLE_FILE_SUFFIXES)})"
            )
        cls = diffusers.StableDiffusionXLPipeline if kwargs.pop("sdxl", False) else None
        loaders = [cls] if cls is not None else [diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline]
        if cls is None and _has_sdxl_keys(path):
            loaders.reverse()
        opts = {"torch_dtype": dtype, "local_files_only": _hub_offline(), **kwargs}
        errors = []
        for loader in loaders:
            try:
                pipe = loader.from_single_file(os.fspath(path), **opts)
            except Exception as err:  # diffusers raises many types for a file it cannot read
                errors.append(f"{loader.__name__}: {type(err).__name__}: {err}")
                continue
            if _is_sdxl_pipeline(pipe) != (loader is diffusers.StableDiffusionXLPipeline) and cls is None:
                continue
            return StableDiffusionModel.from_pipeline(pipe)
        raise ConfigError(
            f"model.name: {path} could not be read as a Stable Diffusion checkpoint ({'; '.join(errors)[:600]}). "
            "Give an SD 1.x/2.x or SDXL .safetensors/.ckpt file; offline, also pass model.kwargs.config: a local "
            "diffusers folder of the same architecture"
        )
    local = path.is_dir()
    if not local and (path.is_absolute() or text.startswith(".")):
        raise ConfigError(f"model.name: {path} does not exist; give a diffusers pipeline folder, a hub id or a "
                          ".safetensors/.ckpt checkpoint")
    if not local and text.count("/") != 1:
        raise ConfigError(
            f"model.name: {text!r} is neither a folder, a checkpoint file nor a hub id (owner/name); give a "
            "diffusers pipeline folder, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5, or a .safetensors file"
        )
    if local and not (path / "model_index.json").is_file():
        raise ConfigError(
            f"model.name: {path} is not a diffusers pipeline folder (no model_index.json); save one with "
            "pipe.save_pretrained, or give a single .safetensors/.ckpt file"
        )
    offline = local or _hub_offline()
    opts: dict[str, Any] = {"local_files_only": offline, **kwargs}
    if dtype is not None:
        opts["torch_dtype"] = dtype
    if variant is not None:
        opts["variant"] = variant
    try:
        index = diffusers.DiffusionPipeline.load_config(text, local_files_only=opts["local_files_only"])
    except Exception as err:  # OSError, EnvironmentError, hub errors
        where = "in the local Hugging Face cache (the hub is offline)" if offline else "on the hub"
        raise ConfigError(f"model.name: the pipeline {text!r} was not found {where} ({err})") from err
    class_name = index.get("_class_name", "")
    if "XL" in class_name:
        pipe_cls = diffusers.StableDiffusionXLPipeline
    elif "StableDiffusion" in class_name:
        pipe_cls = diffusers.StableDiffusionPipeline
        opts.setdefault("safety_checker", None)
        opts.setdefault("requires_safety_checker", False)
    else:
        raise ConfigError(
            f"model.name: {text!r} is a {class_name or 'unknown'} pipeline; visionpeft.diffusion adapts Stable "
            "Diffusion 1.x/2.x and SDXL pipelines"
        )
    try:
        pipe = pipe_cls.from_pretrained(text, **opts)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ConfigError(f"model.name: the pipeline {text!r} could not be loaded ({err})") from err
    return StableDiffusionModel.from_pipeline(pipe)


def _has_sdxl_keys(path: Path) -> bool:
    """Whether a ``.safetensors`` checkpoint has SDXL's second text encoder (``conditioner.embedders.1``)."""
    if path.suffix.lower() != ".safetensors":
        return False
    try:
        from safetensors import safe_open

        with safe_open(os.fspath(path), "pt") as f:
            names = list(f.keys())  # safe_open handles are not iterable
        return any(name.startswith("conditioner.embedders.1.") for name in names)
    except Exception:  # not a readable safetensors file: from_single_file reports it
        return False


def _is_sdxl_pipeline(pipe: Any) -> bool:
    unet = getattr(pipe, "unet", None)
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    key = str(value).removeprefix("torch.")
    if key not in names:
        raise ConfigError(f"model.kwargs.torch_dtype: {value!r} is not a dtype; choose one of {sorted(names)}")
    return names[key]
