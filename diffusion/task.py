"""The ``diffusion`` task: train LoRA, textual inversion or a T2I-Adapter on a Stable Diffusion pipeline.

A run config with ``task: diffusion``::

    model:
      name: stable-diffusion-v1-5/stable-diffusion-v1-5   # hub id, diffusers folder or .safetensors/.ckpt
      kwargs: {torch_dtype: float16}                       # frozen weights in half precision (GPU)
    method: {name: lora, r: 8, alpha: 8, targets: ["@unet_attn"]}
    data:
      root: data/dog                 # the training images
      instance_prompt: a photo of sks dog   # or captions: metadata.jsonl / a .txt per image
      resolution: 512
      loss: {snr_gamma: 5.0}
      sampling: {prompts: ["a photo of sks dog on the beach"], steps: 25}
    train: {max_steps: 500, lr: 1.0e-4, batch_size: 1, eval_every: 100}

``data`` keys: ``format`` (``imagefolder``: captions from ``metadata.jsonl`` or ``.txt`` files;
``dreambooth``: one ``instance_prompt``; by default ``dreambooth`` when ``instance_prompt`` is
given), ``root``, ``resolution`` (512), ``crop`` (``center`` / ``random``), ``flip``,
``caption_column`` (``text``), ``caption_dropout``, ``instance_prompt``, ``class_root`` and
``class_prompt`` (prior preservation with class images you provide), ``condition_root`` (condition
images with the training images' relative names) or ``condition`` (``canny``, ``sketch``) for
T2I-Adapter, ``cache_latents``, ``skip_bad``; ``loss``: ``snr_gamma``, ``noise_offset``,
``prior_loss_weight``, ``timestep_sampling`` (``uniform``, or ``cubic``: the T2I-Adapter paper's);
``sampling``: ``prompts``, ``steps``, ``guidance``, ``seed``,
``negative_prompt``, ``conditions`` (control images for the prompts, T2I-Adapter). Sample grids
are written at every ``train.eval_every`` steps and at the end, into ``samples/``.

At the end of the run :meth:`DiffusionTask.export` writes the files the tools load: a LoRA in
diffusers (``pytorch_lora_weights.safetensors``) and kohya (``lora_kohya.safetensors``) format,
textual-inversion embeddings, or the T2I-Adapter's ``save_pretrained`` folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

import visionpeft as vp
from visionpeft.errors import ConfigError
from visionpeft.runconfig import check_section
from visionpeft.task import Task

FORMATS = ("imagefolder", "dreambooth")
DATA_KEYS: dict[str, tuple[type, ...]] = {
    "resolution": (int,), "crop": (str,), "flip": (bool,), "caption_column": (str,), "caption_dropout": (float, int),
    "instance_prompt": (str,), "class_root": (str,), "class_prompt": (str,), "condition_root": (str,),
    "condition": (str,), "cache_latents": (bool,), "skip_bad": (bool,), "loss": (dict,), "sampling": (dict,),
}
LOSS_KEYS: dict[str, tuple[type, ...]] = {"snr_gamma": (float, int), "noise_offset": (float, int),
                                          "prior_loss_weight": (float, int), "timestep_sampling": (str,)}
SAMPLING_KEYS: dict[str, tuple[type, ...]] = {"prompts": (list,), "steps": (int,), "guidance": (float, int),
                                              "seed": (int,), "negative_prompt": (str,), "conditions": (list,)}
MODEL_KWARGS = ("torch_dtype", "variant", "config", "original_config", "sdxl", "revision")

# diffusers' example scripts' defaults, selected with `train.recipe`; explicit train keys win. Their
# 'constant' schedule has no warmup; AdamW weight decay 1e-2 and gradient clipping at 1.0 throughout.
RECIPES: dict[str, dict[str, Any]] = {
    "text_to_image_lora": {"optimizer": "adamw", "lr": 1e-4, "batch_size": 16, "scheduler": "constant",
                           "weight_decay": 1e-2, "max_grad_norm": 1.0},
    "dreambooth_lora": {"optimizer": "adamw", "lr": 5e-4, "batch_size": 4, "scheduler": "constant",
                        "weight_decay": 1e-2, "max_grad_norm": 1.0},
    "textual_inversion": {"optimizer": "adamw", "lr": 1e-4, "batch_size": 16, "scheduler": "constant",
                          "max_steps": 5000, "weight_decay": 1e-2, "max_grad_norm": 1.0},
    "t2i_adapter": {"optimizer": "adamw", "lr": 5e-6, "batch_size": 16, "scheduler": "constant",
                    "weight_decay": 1e-2, "max_grad_norm": 1.0},
}


class DiffusionTask(Task):
    """Denoising training of a Stable Diffusion adapter (LoRA, textual inversion, T2I-Adapter)."""

    name = "diffusion"
    recipes: ClassVar[dict[str, dict[str, Any]]] = RECIPES

    @classmethod
    def check_config(cls, run: Any) -> None:
        model = run.model
        if not (model.name or model.checkpoint):
            raise ConfigError(
                "model.name: missing; give a diffusers pipeline (a hub id such as "
                "stable-diffusion-v1-5/stable-diffusion-v1-5, or a local folder) or model.checkpoint: a single "
                ".safetensors/.ckpt file"
            )
        unknown = sorted(set(model.kwargs) - set(MODEL_KWARGS))
        if unknown:
            raise ConfigError(f"model.kwargs: unknown key(s) {unknown}; allowed: {list(MODEL_KWARGS)}")
        if "torch_dtype" in model.kwargs:
            from visionpeft.diffusion.models import _dtype

            _dtype(model.kwargs["torch_dtype"])
        data = run.data
        if data.root is None:
            raise ConfigError("data.root: missing; give the folder of training images")
        for key in ("train_split", "eval_split"):
            if getattr(data, key) is not None:
                raise ConfigError(f"data.{key}: the diffusion task trains on data.root and samples "
                                  "data.sampling.prompts; remove it")
        options = check_section("data", data.options, DATA_KEYS, allow_null=True)
        fmt = data.format or ("dreambooth" if options.get("instance_prompt") else "imagefolder")
        if fmt not in FORMATS:
            raise ConfigError(f"data.format: {fmt!r} is not supported; choose one of {list(FORMATS)}")
        if fmt == "dreambooth" and not options.get("instance_prompt"):
            raise ConfigError("data.instance_prompt: missing; format dreambooth trains every image on one prompt, "
                              "e.g. 'a photo of sks dog'")
        if fmt == "imagefolder" and options.get("instance_prompt"):
            raise ConfigError("data.instance_prompt: format imagefolder reads captions from metadata.jsonl or .txt "
                              "files; remove it or set data.format: dreambooth")
        resolution = options.get("resolution", 512)
        if resolution < 8 or resolution % 8:
            raise ConfigError(f"data.resolution: {resolution} must be a positive multiple of 8")
        if options.get("crop", "center") not in ("center", "random"):
            raise ConfigError(f"data.crop: {options['crop']!r} is not allowed; choose 'center' or 'random'")
        dropout = options.get("caption_dropout", 0.0)
        if not 0 <= dropout < 1:
            raise ConfigError(f"data.caption_dropout: {dropout} must be in [0, 1)")
        if bool(options.get("class_root")) != bool(options.get("class_prompt")):
            raise ConfigError("data.class_root and data.class_prompt: prior preservation needs both (a folder of "
                              "class images you provide, and their prompt, e.g. 'a photo of a dog')")
        if options.get("class_root") and not Path(options["class_root"]).is_dir():
            raise ConfigError(
                f"data.class_root: {options['class_root']} does not exist; prior preservation needs class images you "
                "generate beforehand (e.g. with the base pipeline and data.class_prompt): this task does not "
                "generate them"
            )
        if options.get("cache_latents") and (options.get("crop", "center") != "center" or options.get("flip")):
            raise ConfigError("data.cache_latents: latents are encoded once, so it needs data.crop: center and no "
                              "data.flip")
        is_t2i = run.method.get("name") == "t2i_adapter"
        has_condition = bool(options.get("condition_root") or options.get("condition"))
        if options.get("condition_root") and options.get("condition"):
            raise ConfigError("data.condition_root and data.condition: give one (a folder of condition images, or a "
                              "built-in extractor)")
        if options.get("condition"):
            from visionpeft.diffusion.conditions import KINDS

            if options["condition"] not in KINDS:
                raise ConfigError(f"data.condition: {options['condition']!r} is not a built-in extractor; choose one "
                                  f"of {list(KINDS)} or give data.condition_root")
        if is_t2i and not has_condition:
            raise ConfigError("data.condition_root: t2i_adapter trains on condition images; give data.condition_root "
                              "(paired files) or data.condition: canny|sketch")
        if has_condition and not is_t2i:
            raise ConfigError("data.condition: only the t2i_adapter method uses condition images; remove it")
        if has_condition and options.get("class_root"):
            raise ConfigError("data.class_root: prior preservation does not combine with T2I-Adapter conditions")
        loss = check_section("data.loss", options.get("loss") or {}, LOSS_KEYS, allow_null=True)
        if loss.get("snr_gamma") is not None and loss["snr_gamma"] <= 0:
            raise ConfigError(f"data.loss.snr_gamma: {loss['snr_gamma']} must be > 0 (5.0 is the paper's)")
        for key in ("noise_offset", "prior_loss_weight"):
            if loss.get(key) is not None and loss[key] < 0:
                raise ConfigError(f"data.loss.{key}: {loss[key]} must be >= 0")
        from visionpeft.diffusion.loss import TIMESTEP_SAMPLING

        if loss.get("timestep_sampling", "uniform") not in TIMESTEP_SAMPLING:
            raise ConfigError(f"data.loss.timestep_sampling: {loss['timestep_sampling']!r}; choose one of "
                              f"{list(TIMESTEP_SAMPLING)} (cubic: the T2I-Adapter paper's)")
        sampling = check_section("data.sampling", options.get("sampling") or {}, SAMPLING_KEYS, allow_null=True)
        prompts = sampling.get("prompts") or []
        if not all(isinstance(p, str) for p in prompts):
            raise ConfigError("data.sampling.prompts: expected a list of prompt strings")
        if sampling.get("steps") is not None and sampling["steps"] < 1:
            raise ConfigError("data.sampling.steps: must be >= 1")
        conditions = sampling.get("conditions")
        if conditions is not None:
            if not is_t2i:
                raise ConfigError("data.sampling.conditions: only t2i_adapter samples with condition images")
            if len(conditions) != len(prompts):
                raise ConfigError(f"data.sampling.conditions: {len(conditions)} images for {len(prompts)} prompts; "
                                  "give one per prompt")

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.options = dict(run.data.options)
        self.loss_options = dict(self.options.get("loss") or {})
        self.sampling = dict(self.options.get("sampling") or {})
        self.resolution = self.options.get("resolution", 512)
        self._model: nn.Module | None = None
        self._train: Dataset | None = None

    # -- model --

    def build_model(self, adapter: str | os.PathLike | None = None) -> nn.Module:
        from visionpeft.diffusion.loss import PREDICTION_TYPES
        from visionpeft.diffusion.models import load_sd_model

        model_cfg = self.run.model
        torch.manual_seed(self.run.train.seed)
        model = load_sd_model(model_cfg.checkpoint or model_cfg.name, **model_cfg.kwargs)
        multiple = model.vae_scale_factor * 2 ** (len(model.unet.config.block_out_channels) - 1)
        if self.resolution % multiple:
            raise ConfigError(f"data.resolution: {self.resolution} must be a multiple of {multiple} for this UNet "
                              "and VAE (their downsampling)")
        if adapter is not None:
            model = vp.load(model, adapter)
        else:
            # Checked here, not at the first loss, so a run for an untrainable scheduler stops before it starts.
            if model.prediction_type not in PREDICTION_TYPES:
                raise ConfigError(
                    f"model: the checkpoint's noise scheduler has prediction_type {model.prediction_type!r}; "
                    f"training supports {list(PREDICTION_TYPES)}; use a checkpoint whose scheduler predicts one of "
                    "them (its scheduler/scheduler_config.json)"
                )
            method = {k: v for k, v in self.run.method.items() if k != "name"}
            model = vp.attach(model, self.run.method["name"], **method)
        self._model = model
        return model

    def _sd(self) -> nn.Module:
        if self._model is None:
            raise ConfigError("the diffusion task builds its data after the model: call build_model() first")
        return self._model

    # -- data --

    def train_dataset(self) -> Dataset:
        from visionpeft.diffusion import data

        if self._train is not None:
            return self._train
        sd = self._sd()
        opts = self.options
        root = Path(self.run.data.root)
        records = data.read_records(root, instance_prompt=opts.get("instance_prompt"),
                                    caption_column=opts.get("caption_column", "text"))
        class_records = None
        if opts.get("class_root"):
            class_records = data.read_records(Path(opts["class_root"]), instance_prompt=opts["class_prompt"])
        adapter = sd.find_t2i_adapter()
        channels = adapter.config.in_channels if adapter is not None else 3
        dataset = data.SDImageDataset(
            records, resolution=self.resolution, crop=opts.get("crop", "center"), flip=opts.get("flip", False),
            caption_dropout=float(opts.get("caption_dropout", 0.0)), class_records=class_records,
            condition_root=Path(opts["condition_root"]) if opts.get("condition_root") else None,
            condition_kind=opts.get("condition"), condition_channels=channels, image_root=root,
            skip_bad=opts.get("skip_bad", False), seed=self.run.train.seed,
        )
        if opts.get("cache_latents"):
            from visionpeft.diffusion.models import vae_posterior

            dataset.set_latent_cache(lambda pixels: vae_posterior(sd.vae, pixels).parameters)
        self._train = dataset
        return dataset

    def eval_dataset(self) -> Dataset | None:
        from visionpeft.diffusion.data import SamplePrompts

        prompts = self.sampling.get("prompts") or []
        return SamplePrompts(prompts, seed=self.sampling.get("seed", 0)) if prompts else None

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """A training batch (token ids from the model's current tokenizers) or a list of sample prompts."""
        from visionpeft.diffusion.data import collate

        return collate(items, self._sd().tokenize)

    # -- training --

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        from visionpeft.diffusion.loss import diffusion_loss

        opts = self.loss_options
        return diffusion_loss(
            model, batch, snr_gamma=opts.get("snr_gamma"), noise_offset=float(opts.get("noise_offset") or 0.0),
            prior_loss_weight=float(opts.get("prior_loss_weight", 1.0) if opts.get("prior_loss_weight") is not None
                                    else 1.0),
            timestep_sampling=opts.get("timestep_sampling") or "uniform",
        )

    def _sample_conditions(self, indices: list[int]) -> list[Any] | None:
        from PIL import Image

        from visionpeft.diffusion.data import condition_to_mode, open_image

        sd = self._sd()
        if sd.find_t2i_adapter() is None:
            return None
        channels = sd.find_t2i_adapter().config.in_channels
        size = (self.resolution, self.resolution)
        paths = self.sampling.get("conditions")
        out = []
        for index in indices:
            if paths is not None:
                path = Path(paths[index])
                image = condition_to_mode(open_image(path), channels, path)
            else:
                # The training set's own conditions, in order: the prompts are sampled under them.
                item = self.train_dataset()[index % len(self.train_dataset())]
                array = (item["condition"].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
            out.append(image.resize(size, resample=Image.Resampling.BILINEAR))
        return out

    def evaluate(self, model: nn.Module, batches: Any) -> dict[str, Any]:
        """Sample the prompts into a grid ``samples/step-XXXXXXX_seed-S.png``; return the count and the file."""
        from visionpeft.diffusion.sampling import save_samples

        prompts: list[str] = []
        seeds: list[int] = []
        indices: list[int] = []
        for batch in batches:
            prompts += batch["sample_prompts"]
            seeds += batch["sample_seeds"]
            indices += batch["sample_indices"]
        if not prompts:
            return {}
        sd = getattr(model, "module", model)
        path = save_samples(
            sd, prompts, seeds, self.run.output_dir, self.step, num_inference_steps=self.sampling.get("steps", 25),
            guidance_scale=float(self.sampling.get("guidance", 7.5)), height=self.resolution, width=self.resolution,
            negative_prompt=self.sampling.get("negative_prompt"), conditions=self._sample_conditions(indices),
        )
        return {"samples": len(prompts), "grid": str(Path(path).relative_to(self.run.output_dir))}

    def export(self, model: nn.Module, output_dir: str | os.PathLike) -> None:
        """Write the method's files for the tools: LoRA (diffusers + kohya), embeddings, or the adapter folder."""
        method = self.run.method["name"]
        sd = getattr(model, "module", model)
        if method == "lora":
            from visionpeft.diffusion.lora_export import export_lora

            export_lora(sd, output_dir, ss_output_name=Path(output_dir).name,
                        ss_sd_model_name=str(self.run.model.checkpoint or self.run.model.name),
                        ss_resolution=f"({self.resolution}, {self.resolution})")
        elif method == "textual_inversion":
            from visionpeft.diffusion.textual_inversion import export_embeddings

            export_embeddings(sd, output_dir, step=self.step or None)
        elif method == "t2i_adapter":
            from visionpeft.diffusion.t2i_adapter import export_adapter

            export_adapter(sd, output_dir)
