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
``negative_prompt``, ``conditions`` (control images for the prompts, T2I-Adapter).

Evaluation (every ``train.eval_every`` steps, at the end, and ``visionpeft eval``) is the
denoising loss at fixed timesteps with fixed noise (:mod:`visionpeft.diffusion.evaluation`) on
``eval_images`` images (8; -1 all, 0 none) of ``eval_root`` (held-out images, captioned as
``root``) or, without it, on the first training images (labelled as such: not held out), at
``eval_timesteps`` with noise from ``eval_seed``; plus a sample grid into ``samples/`` of
``sampling.prompts`` (by default the captions of the first four training images: for DreamBooth
the instance prompt with four seeds; ``[]`` for none). Each evaluation writes ``results.json``.

:class:`DiffusionData` declares every key with its default, type and bounds. At the end of the
run each method writes the files the tools load (its ``export``): a LoRA in diffusers
(``pytorch_lora_weights.safetensors``) and kohya (``lora_kohya.safetensors``) format,
textual-inversion embeddings, or the T2I-Adapter's ``save_pretrained`` folder. The task names no
method: a method that takes condition images says so (``takes_conditions``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

import visionpeft as vp
from visionpeft.config import Section, field
from visionpeft.errors import ConfigError
from visionpeft.files import atomic_write_text
from visionpeft.method import attached_methods
from visionpeft.registry import get_method, list_methods
from visionpeft.task import DataConfig, Task

FORMATS = ("imagefolder", "dreambooth")
#: how many prompts the sample grids have by default (the first training images' captions)
DEFAULT_SAMPLES = 4
MODEL_KWARGS = ("torch_dtype", "variant", "config", "original_config", "sdxl", "revision")
#: what a YAML user does about an unreadable image
SKIP_HINT = "set data.skip_bad: true"


@dataclasses.dataclass
class LossOptions(Section):
    """``data.loss``: the denoising loss."""

    prefix = "data.loss."

    snr_gamma: float | None = field(None, help="min-SNR weighting gamma (5.0 is the paper's); null: off", gt=0)
    noise_offset: float = field(0.0, help="noise offset (0.05-0.1 for darker / brighter images)", ge=0)
    prior_loss_weight: float = field(1.0, help="weight of the class images' loss (prior preservation)", ge=0)
    timestep_sampling: str = field("uniform", help="uniform, or cubic: the T2I-Adapter paper's (more noisy steps)")

    def check(self) -> None:
        from visionpeft.diffusion.loss import TIMESTEP_SAMPLING

        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ConfigError(f"data.loss.timestep_sampling: {self.timestep_sampling!r} is not allowed; choose one of "
                              f"{list(TIMESTEP_SAMPLING)} (cubic: the T2I-Adapter paper's)")


@dataclasses.dataclass
class SamplingOptions(Section):
    """``data.sampling``: the sample grids written at every evaluation."""

    prefix = "data.sampling."

    prompts: list[str] | None = field(
        None, help="prompts sampled at each evaluation; default: the captions of the first 4 training images "
        "(DreamBooth: the instance prompt, 4 seeds); []: no grids"
    )
    steps: int = field(25, help="inference steps", ge=1)
    guidance: float = field(7.5, help="classifier-free guidance scale", ge=0)
    seed: int = field(0, help="seed of the first prompt (the next prompts count up)")
    negative_prompt: str | None = field(None, help="the negative prompt")
    conditions: list[str] | None = field(
        None, help="condition images, one per prompt (methods that take them), center-cropped as training images"
    )


@dataclasses.dataclass
class DiffusionData(DataConfig):
    """The ``data`` keys of the diffusion task."""

    resolution: int = field(512, help="training resolution (a multiple of 8, and of the UNet's downsampling)", ge=1)
    crop: Literal["center", "random"] = field("center", help="how images are cropped to the resolution")
    flip: bool = field(False, help="random horizontal flips")
    caption_column: str = field("text", help="the caption's column in metadata.jsonl")
    caption_dropout: float = field(0.0, help="fraction of captions replaced by the empty prompt", ge=0, lt=1)
    instance_prompt: str | None = field(None, help="one prompt for every image (DreamBooth)")
    class_root: str | None = field(None, help="class images you provide, for prior preservation")
    class_prompt: str | None = field(None, help="the class images' prompt, e.g. 'a photo of a dog'")
    condition_root: str | None = field(None, help="condition images with the training images' relative names")
    condition: str | None = field(None, help="a built-in condition extractor (canny, sketch)")
    cache_latents: bool = field(False, help="encode every image once (needs crop: center and no flip)")
    skip_bad: bool = field(False, help="drop unreadable images instead of stopping")
    eval_root: str | None = field(None, help="held-out images (captioned as data.root) for the evaluation loss; "
                                  "default: the first training images")
    eval_images: int = field(8, help="images in the evaluation loss: the first N (-1: all, 0: no loss)", ge=-1)
    eval_timesteps: list[int] = field([100, 300, 500, 700, 900], help="the timesteps each evaluation image is "
                                      "noised at", ge=0)
    eval_seed: int = field(0, help="seed of the evaluation noise (the same in every run and at every step)")
    loss: LossOptions = field(LossOptions(), help="the loss")
    sampling: SamplingOptions = field(SamplingOptions(), help="the sample grids")

    @property
    def kind(self) -> str:
        """The format: ``data.format``, or ``dreambooth`` with an instance prompt, else ``imagefolder``."""
        return self.format or ("dreambooth" if self.instance_prompt else "imagefolder")

    def check(self) -> None:
        if self.root is None:
            raise ConfigError("data.root: missing; give the folder of training images")
        if self.train_split is not None:
            raise ConfigError("data.train_split: the diffusion task trains on the images of data.root; remove it")
        if self.eval_split is not None:
            raise ConfigError("data.eval_split: the diffusion task has no splits; give held-out images as "
                              "data.eval_root (a folder captioned like data.root), or remove it")
        self._check_eval()
        if self.kind not in FORMATS:
            raise ConfigError(f"data.format: {self.kind!r} is not supported; choose one of {list(FORMATS)}")
        if self.kind == "dreambooth" and not self.instance_prompt:
            raise ConfigError("data.instance_prompt: missing; format dreambooth trains every image on one prompt, "
                              "e.g. 'a photo of sks dog'")
        if self.kind == "imagefolder" and self.instance_prompt:
            raise ConfigError("data.instance_prompt: format imagefolder reads captions from metadata.jsonl or .txt "
                              "files; remove it or set data.format: dreambooth")
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"data.resolution: {self.resolution} must be a positive multiple of 8")
        if bool(self.class_root) != bool(self.class_prompt):
            raise ConfigError("data.class_root and data.class_prompt: prior preservation needs both (a folder of "
                              "class images you provide, and their prompt, e.g. 'a photo of a dog')")
        if self.class_root and not Path(self.class_root).is_dir():
            raise ConfigError(
                f"data.class_root: {self.class_root} does not exist; prior preservation needs class images you "
                "generate beforehand (e.g. with the base pipeline and data.class_prompt): this task does not "
                "generate them"
            )
        if self.cache_latents and (self.crop != "center" or self.flip):
            raise ConfigError("data.cache_latents: latents are encoded once, so it needs data.crop: center and no "
                              "data.flip")
        if self.condition_root and self.condition:
            raise ConfigError("data.condition_root and data.condition: give one (a folder of condition images, or a "
                              "built-in extractor)")
        if self.condition:
            from visionpeft.diffusion.conditions import KINDS

            if self.condition not in KINDS:
                raise ConfigError(f"data.condition: {self.condition!r} is not a built-in extractor; choose one "
                                  f"of {list(KINDS)} or give data.condition_root")
        if self.has_conditions and self.class_root:
            raise ConfigError("data.class_root: prior preservation does not combine with condition images")
        conditions, prompts = self.sampling.conditions, self.sampling.prompts
        if conditions is not None and prompts is None:
            raise ConfigError("data.sampling.conditions: give data.sampling.prompts too, one per condition image")
        if conditions is not None and len(conditions) != len(prompts):
            raise ConfigError(f"data.sampling.conditions: {len(conditions)} images for {len(prompts)} "
                              "prompts; give one per prompt")

    def _check_eval(self) -> None:
        if self.eval_images == 0:
            if self.eval_root:
                raise ConfigError("data.eval_root: data.eval_images is 0, so no image is evaluated; remove one of them")
            return
        if not self.eval_timesteps:
            raise ConfigError("data.eval_timesteps: empty; give the timesteps to evaluate at (e.g. [100, 500, 900]), "
                              "or data.eval_images: 0 for no evaluation loss")
        if len(set(self.eval_timesteps)) != len(self.eval_timesteps):
            raise ConfigError(f"data.eval_timesteps: {self.eval_timesteps} repeats a timestep; give each once")
        if self.eval_root and not Path(self.eval_root).is_dir():
            raise ConfigError(f"data.eval_root: {self.eval_root} is not a folder; give a folder of held-out images "
                              "captioned like data.root, or remove it to evaluate on the first training images")
        if self.eval_root and self.condition_root:
            raise ConfigError("data.eval_root: held-out images cannot take their conditions from data.condition_root; "
                              "use a built-in data.condition, or remove data.eval_root to evaluate on training images")

    @property
    def has_conditions(self) -> bool:
        """Whether the data gives condition images (a folder of them, or a built-in extractor)."""
        return bool(self.condition_root or self.condition)


def condition_methods() -> list[str]:
    """The registered methods that train on condition images (``takes_conditions``)."""
    return [m.name for m in list_methods() if getattr(get_method(m.name), "takes_conditions", False)]


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
    Data = DiffusionData
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
        data, method = run.data, run.method.method
        if getattr(get_method(method), "takes_conditions", False):
            if not data.has_conditions:
                raise ConfigError(f"data.condition_root: {method} trains on condition images; give "
                                  "data.condition_root (paired files) or data.condition: canny|sketch")
        else:
            takers = " or ".join(condition_methods()) or "none installed"
            if data.has_conditions:
                raise ConfigError(f"data.condition: only the {takers} method uses condition images; remove it")
            if data.sampling.conditions is not None:
                raise ConfigError(f"data.sampling.conditions: only {takers} samples with condition images")

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.data: DiffusionData = run.data
        self.resolution = self.data.resolution
        self._model: nn.Module | None = None
        self._train: Dataset | None = None
        self._eval: tuple[Dataset | None] | None = None
        self._prompts: list[str] | None = None

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
            model = vp.attach(model, self.run.method)
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
        opts = self.data
        root = Path(opts.root)
        records = data.read_records(root, instance_prompt=opts.instance_prompt, caption_column=opts.caption_column)
        class_records = None
        if opts.class_root:
            class_records = data.read_records(Path(opts.class_root), instance_prompt=opts.class_prompt)
        dataset = data.SDImageDataset(
            records, resolution=self.resolution, crop=opts.crop, flip=opts.flip, caption_dropout=opts.caption_dropout,
            class_records=class_records, condition_root=Path(opts.condition_root) if opts.condition_root else None,
            condition_kind=opts.condition, condition_channels=self._condition_channels() or 3, image_root=root,
            skip_bad=opts.skip_bad, skip_hint=SKIP_HINT, seed=self.run.train.seed,
        )
        self._check_prompts(dataset)
        if opts.cache_latents:
            from visionpeft.diffusion.models import vae_posterior

            dataset.set_latent_cache(lambda pixels: vae_posterior(sd.vae, pixels).parameters)
        self._train = dataset
        return dataset

    def _check_prompts(self, dataset: Dataset) -> None:
        """Let every attached method refuse the training prompts before any step (``check_prompts``)."""
        from visionpeft.diffusion.data import caption_source

        opts = self.data
        source = caption_source(Path(opts.root), instance_prompt=opts.instance_prompt,
                                caption_column=opts.caption_column)
        prompts = [record.caption for record in dataset.records]
        class_prompts = [record.caption for record in dataset.class_records]
        for method in attached_methods(self._sd()):
            check = getattr(method, "check_prompts", None)
            if check is not None:
                check(self._sd(), prompts, source, class_prompts)

    def _condition_channels(self) -> int | None:
        """The channels of the condition images the attached method takes, or ``None``."""
        for method in attached_methods(self._sd()):
            channels = getattr(method, "condition_channels", lambda model: None)(self._sd())
            if channels is not None:
                return channels
        return None

    def eval_dataset(self) -> Dataset | None:
        """The evaluation images (``None`` when neither a loss nor a sample grid is asked for).

        With only sample grids the set holds no image, and the evaluation samples the prompts alone.
        """
        if self._eval is None:
            from visionpeft.diffusion.evaluation import EvalImages

            images = self._eval_images()
            self._eval = (EvalImages(images) if images is not None or self._sample_prompts() else None,)
        return self._eval[0]

    def _eval_images(self) -> Dataset | None:
        """The images of the evaluation loss: the first ``eval_images`` of ``eval_root`` or of ``root``."""
        from visionpeft.diffusion import data

        opts = self.data
        if opts.eval_images == 0:
            return None
        steps = self._sd().noise_scheduler.config.num_train_timesteps
        if max(opts.eval_timesteps) >= steps:
            raise ConfigError(f"data.eval_timesteps: {max(opts.eval_timesteps)} is not a timestep of this model's "
                              f"scheduler (0 to {steps - 1})")
        root = Path(opts.eval_root or opts.root)
        records = data.read_records(root, instance_prompt=opts.instance_prompt, caption_column=opts.caption_column)
        records = records if opts.eval_images < 0 else records[: opts.eval_images]
        condition_root = Path(opts.condition_root) if opts.condition_root and not opts.eval_root else None
        return data.SDImageDataset(
            records, resolution=self.resolution, crop="center", condition_root=condition_root,
            condition_kind=opts.condition, condition_channels=self._condition_channels() or 3, image_root=root,
            skip_bad=opts.skip_bad, skip_hint=SKIP_HINT,
        )

    def _eval_set(self, images: int) -> str:
        opts = self.data
        if opts.eval_root:
            return f"{images} held-out images of {opts.eval_root} (data.eval_root)"
        return (f"the first {images} training images of {opts.root}, not held out (give data.eval_root for a "
                "held-out set)")

    def _sample_prompts(self) -> list[str]:
        """The prompts of the sample grids: ``sampling.prompts``, or the first training images' captions."""
        if self._prompts is None:
            prompts = self.data.sampling.prompts
            opts = self.data
            if prompts is None and opts.instance_prompt:
                prompts = [opts.instance_prompt] * DEFAULT_SAMPLES
            elif prompts is None:
                from visionpeft.diffusion import data

                records = data.read_records(Path(opts.root), caption_column=opts.caption_column)
                prompts = [record.caption for record in records[:DEFAULT_SAMPLES]]
            self._prompts = list(prompts)
        return self._prompts

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch (token ids from the model's current tokenizers); evaluation items keep their ``eval_index``."""
        from visionpeft.diffusion.data import collate

        batch = collate(items, self._sd().tokenize)
        if "eval_index" in items[0]:
            batch["eval_index"] = torch.tensor([item["eval_index"] for item in items])
        return batch

    # -- training --

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        from visionpeft.diffusion.loss import diffusion_loss

        opts = self.data.loss
        return diffusion_loss(model, batch, snr_gamma=opts.snr_gamma, noise_offset=opts.noise_offset,
                              prior_loss_weight=opts.prior_loss_weight, timestep_sampling=opts.timestep_sampling)

    def _sample_conditions(self, indices: list[int]) -> list[Any] | None:
        """The condition image of each sample prompt (``None`` for a method that takes none), square at the resolution.

        ``data.sampling.conditions`` are center-cropped as training images are (``crop: center``), not
        stretched; without them the training set's own conditions, already cropped, are used in order.
        """
        from PIL import Image

        from visionpeft.diffusion.data import center_crop, condition_to_mode, open_image

        channels = self._condition_channels()
        if channels is None:
            return None
        paths = self.data.sampling.conditions
        out = []
        for index in indices:
            if paths is not None:
                path = Path(paths[index])
                out.append(center_crop(condition_to_mode(open_image(path), channels, path), self.resolution))
            else:
                # The training set's own conditions, in order: the prompts are sampled under them.
                item = self.train_dataset()[index % len(self.train_dataset())]
                array = (item["condition"].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                out.append(Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array))
        return out

    def evaluate(self, model: nn.Module, batches: Any) -> dict[str, float]:
        """The summed denoising errors of this process's evaluation images at ``data.eval_timesteps``."""
        from visionpeft.diffusion.evaluation import denoising_totals

        return denoising_totals(model, batches, self.data.eval_timesteps, self.data.eval_seed)

    def summarize(self, totals: dict[str, float]) -> dict[str, Any]:
        """``loss`` (and ``loss_t{t}`` per timestep) over ``images`` evaluation images, and the grid's file."""
        from visionpeft.diffusion.evaluation import denoising_metrics
        from visionpeft.diffusion.sampling import grid_name

        metrics = denoising_metrics(totals, self.data.eval_timesteps)
        if metrics:
            metrics["eval_set"] = "held_out" if self.data.eval_root else "training_images"
        prompts = self._sample_prompts()
        if prompts:
            metrics.update(samples=len(prompts), grid=grid_name(self.step, self.data.sampling.seed))
        return metrics

    def write_evaluation(self, model: nn.Module, metrics: dict[str, Any]) -> None:
        """Sample the prompts into ``samples/step-XXXXXXX_seed-S.png`` and write ``results.json``."""
        from visionpeft.diffusion.sampling import save_samples

        prompts = self._sample_prompts()
        sampling = self.data.sampling
        if prompts:
            save_samples(
                getattr(model, "module", model), prompts, [sampling.seed + i for i in range(len(prompts))],
                self.run.output_dir, self.step, num_inference_steps=sampling.steps, guidance_scale=sampling.guidance,
                height=self.resolution, width=self.resolution, negative_prompt=sampling.negative_prompt,
                conditions=self._sample_conditions(list(range(len(prompts)))),
            )
        record: dict[str, Any] = {"step": self.step, **metrics}
        if "images" in metrics:
            record.update(eval_images=self._eval_set(metrics["images"]), eval_timesteps=self.data.eval_timesteps,
                          eval_seed=self.data.eval_seed,
                          note="loss: the plain MSE of the prediction at fixed timesteps and noise (no min-SNR "
                          "weighting), comparable between runs and steps")
        out = Path(self.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.json", json.dumps(record, indent=2) + "\n")

    def no_evaluation(self) -> str:
        return ("data.eval_images is 0 and data.sampling.prompts is empty: nothing to evaluate; set data.eval_images "
                "(the denoising loss, on data.eval_root or the training images) or data.sampling.prompts")
