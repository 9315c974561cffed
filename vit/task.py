"""The ``vit`` task: image and video classification with an adapted timm ViT.

A run config with ``task: vit`` names a timm model, a method and a data set in one of the formats
below; the shared trainer does the rest. Data options by format:

* ``vtab``: ``root`` is a VTAB-1k task folder (or the VTAB-1k root with ``vtab_task``); splits
  ``train800``, ``val200``, ``train800val200``, ``test``; resize to ``image_size``, no augmentation.
* ``fgvc``: ``root`` holds ``train.json`` / ``val.json`` / ``test.json``; ``dataset`` picks the
  image root (CUB, NABirds, StanfordDogs, OxfordFlowers, StanfordCars); resize 256 → random crop
  224 + flip for training, center crop for evaluation.
* ``imagefolder``: ``root/<split>/<class>/<image>``, every split labelled by the training split's
  class folders (a class only an evaluation split has is an error).
* ``video``: ``root`` holds the frame folders, the splits are ``path label`` list files;
  ``num_frames``, ``sampling`` (``uniform`` or ``stride``), ``stride``.

Common options: ``image_size`` (default: the model's own input size), ``normalization``
(``model``: the checkpoint's own statistics, ``imagenet`` as VPT, ``inception``), ``transform``
(override the format's), ``skip_bad`` (drop unreadable images and report how many),
``num_classes`` (default: from the data). :class:`VitData` declares them all, with their types and
bounds; a format's own key given for another format is refused with the keys that format takes.

``train.recipe`` presets the schedule of a paper (``vpt``, ``noah``, ``adaptformer``, ``st_adapter``);
the ``vpt``, ``adaptformer`` and ``st_adapter`` recipes also build their paper's head
(:data:`RECIPE_HEADS`) for a method whose config has a ``head`` field the user left unset.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import visionpeft as vp
from visionpeft.config import field, offer
from visionpeft.errors import ConfigError
from visionpeft.task import DataConfig, Task

#: each format's default splits and transform
FORMATS: dict[str, dict[str, str]] = {
    "vtab": {"train_split": "train800val200", "eval_split": "test", "transform": "vtab"},
    "fgvc": {"train_split": "train", "eval_split": "test", "transform": "fgvc"},
    "imagefolder": {"train_split": "train", "eval_split": "val", "transform": "fgvc"},
    "video": {"train_split": "train.txt", "eval_split": "val.txt", "transform": "vtab"},
}
#: what a YAML user does about an unreadable image
SKIP_HINT = "set data.skip_bad: true"


@dataclasses.dataclass
class VitData(DataConfig):
    """The ``data`` keys of the vit task."""

    image_size: int | None = field(None, help="input resolution; default: the model's own", ge=1)
    normalization: Literal["model", "imagenet", "inception"] = field(
        "model", help="mean/std: the checkpoint's own, ImageNet's (as VPT) or Inception's"
    )
    transform: Literal["vtab", "fgvc", "none"] | None = field(None, help="the transform; default: the format's")
    skip_bad: bool = field(False, help="drop unreadable images (and report how many) instead of stopping")
    num_classes: int | None = field(None, help="the head's size; default: the classes of the training split", ge=1)
    vtab_task: str | None = field(None, help="the VTAB-1k task folder under root", only_for={"format": ("vtab",)})
    dataset: str | None = field(None, help="the FGVC data set (CUB, NABirds, ...)", only_for={"format": ("fgvc",)})
    num_frames: int = field(8, help="frames per clip", ge=1, only_for={"format": ("video",)})
    sampling: Literal["uniform", "stride"] = field(
        "uniform", help="how frames are drawn from a clip", only_for={"format": ("video",)}
    )
    stride: int = field(4, help="frames between samples with sampling: stride", ge=1, only_for={"format": ("video",)})

    def check(self) -> None:
        self.require(sorted(FORMATS), "the data set's folder")

    @property
    def split_train(self) -> str:
        """The training split: ``train_split`` or the format's default."""
        return self.train_split or FORMATS[self.format]["train_split"]

    @property
    def split_eval(self) -> str:
        """The evaluation split: ``eval_split`` or the format's default (``none``: no evaluation)."""
        return self.eval_split or FORMATS[self.format]["eval_split"]


# Presets of the papers' schedules, selected with `train.recipe`; explicit train keys win.
RECIPES: dict[str, dict[str, Any]] = {
    # KMnP/vpt: SGD with momentum, 10 warmup epochs then cosine, 100 epochs, lr = base_lr x batch / 256.
    "vpt": {"optimizer": "sgd", "momentum": 0.9, "scheduler": "cosine", "warmup_epochs": 10, "epochs": 100,
            "batch_size": 128, "weight_decay": 1e-4, "scale_lr": True},
    # NOAH / V-PETL Bench: AdamW lr 1e-3, weight decay 1e-4, batch 64, 100 epochs, 10 warmup, min lr 1e-5.
    "noah": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 64, "epochs": 100,
             "warmup_epochs": 10, "scheduler": "cosine", "min_lr": 1e-5},
    # ShoufaChen/AdaptFormer main_image.py + README: SGD momentum 0.9, blr 0.1 x batch / 256, no weight decay,
    # 100 epochs with 20 warmup, half-cycle cosine to 0, 128 images per GPU (x 8 GPUs in the README).
    "adaptformer": {"optimizer": "sgd", "momentum": 0.9, "lr": 0.1, "scale_lr": True, "weight_decay": 0.0,
                    "batch_size": 128, "epochs": 100, "warmup_epochs": 20, "scheduler": "cosine", "min_lr": 0.0},
    # linziyi96/st-adapter main.py + the K400 script: AdamW, blr 1e-3 x batch / 256, weight decay 0.01 (none on
    # biases), 2 warmup epochs then cosine, 64 clips per GPU, 12 epochs (the SSv2 script trains 50).
    "st_adapter": {"optimizer": "adamw", "lr": 1e-3, "scale_lr": True, "weight_decay": 0.01, "batch_size": 64,
                   "epochs": 12, "warmup_epochs": 2, "scheduler": "cosine"},
}
#: the head each recipe builds (``visionpeft.vit.base.HEAD_RECIPES``), offered to every method config that has
#: a ``head`` field the user left unset: a recipe is its paper's whole protocol, head included (VPT's code
#: builds its head so for every transfer type, its baselines too). Without a recipe the head is the model's own.
RECIPE_HEADS: dict[str, str] = {"vpt": "vpt", "adaptformer": "adaptformer", "st_adapter": "st_adapter"}


class VitTask(Task):
    """Classification of images (or clips) with a timm ViT and any ``vit`` or generic method."""

    name = "vit"
    Data = VitData
    recipes: ClassVar[dict[str, dict[str, Any]]] = RECIPES

    @classmethod
    def check_config(cls, run: Any) -> None:
        if not run.model.name:
            raise ConfigError("model.name: missing; give a timm model name, e.g. vit_base_patch16_224.orig_in21k")

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.data: VitData = run.data
        self._datasets: dict[tuple[str, bool], Dataset] = {}
        self._model: nn.Module | None = None
        self._image_size: int | None = None

    # -- data --

    def _transform(self, train: bool):
        from visionpeft.vit.transforms import build_transform, normalization_for

        mean, std = normalization_for(self._model, self.data.normalization)
        kind = self.data.transform or FORMATS[self.data.format]["transform"]
        return build_transform(kind, train=train, image_size=self._image_size, mean=mean, std=std)

    def _split(self, split: str, train: bool) -> Dataset:
        """The data set of ``split``, read (and its images checked) once; its transform is set later.

        Reading the class list needs no transform, so the head can be sized before the model is
        built, from the very data set that then trains. Any other split is labelled with the
        training split's classes, so that its labels mean what the head learned.
        """
        from visionpeft.vit import data

        key = (split, train)
        if key in self._datasets:
            return self._datasets[key]
        root, options = Path(self.data.root), self.data
        checked = {"skip_bad": options.skip_bad, "skip_hint": SKIP_HINT}
        fmt = options.format
        classes = None
        # Every split of a VTAB-1k folder has the same classes already (VTAB1k reads all its split files).
        if fmt != "vtab" and key != (options.split_train, True):
            classes = self._split(options.split_train, train=True).classes
        if fmt == "vtab":
            if options.vtab_task is not None:
                root = data.vtab_task_dir(root, options.vtab_task)
            dataset = data.VTAB1k(root, split, **checked)
        elif fmt == "fgvc":
            dataset = data.FGVC(root, split, dataset=options.dataset, classes=classes, own_classes=classes is None,
                                **checked)
        elif fmt == "imagefolder":
            dataset = data.ImageFolderDataset(root / split, classes=classes, classes_source=root / options.split_train,
                                              **checked)
        else:
            dataset = data.VideoFrames(root, root / split, num_frames=options.num_frames, sampling=options.sampling,
                                       stride=options.stride, train=train, seed=self.run.train.seed,
                                       # data.num_classes, when given, bounds the labels instead (_check_labels).
                                       num_classes=None if classes is None or options.num_classes else len(classes),
                                       classes_source=str(root / options.split_train), **checked)
        self._check_labels(dataset, split)
        self._datasets[key] = dataset
        return dataset

    def _dataset(self, split: str, train: bool) -> Dataset:
        if self._model is None:
            raise ConfigError("build the model before the data: the transform uses the model's input size and "
                              "normalisation")
        dataset = self._split(split, train)
        dataset.transform = self._transform(train)
        return dataset

    def train_dataset(self) -> Dataset:
        return self._dataset(self.data.split_train, train=True)

    def eval_dataset(self) -> Dataset | None:
        split = self.data.split_eval
        if split in ("", "none"):
            return None
        return self._dataset(split, train=False)

    def no_evaluation(self) -> str:
        return (f"data.eval_split: {self.data.eval_split!r} turns evaluation off; set it to a split of the data "
                f"(the {self.data.format} format's default is {FORMATS[self.data.format]['eval_split']!r})")

    def num_classes(self) -> int:
        """The head's size: ``data.num_classes`` or the number of classes of the training split."""
        if self.data.num_classes is not None:
            return self.data.num_classes
        return len(self._split(self.data.split_train, train=True).classes)

    # -- model --

    def build_model(self, adapter: str | os.PathLike | None = None) -> nn.Module:
        from visionpeft.vit.models import build_vit
        from visionpeft.vit.surface import find_vit
        from visionpeft.vit.video import VideoClassifier

        model_cfg = self.run.model
        self._model = None
        num_classes = self.num_classes()
        # Seeded, so that a randomly initialised backbone (and the fresh head) is the same at
        # training and evaluation time.
        torch.manual_seed(self.run.train.seed)
        backbone = build_vit(model_cfg.name, num_classes, pretrained=model_cfg.pretrained,
                             checkpoint=model_cfg.checkpoint, **model_cfg.kwargs)
        self._model = backbone
        self._image_size = self._check_image_size(find_vit(backbone))
        if self.data.format == "video":
            backbone = VideoClassifier(backbone, self.data.num_frames)
        if adapter is not None:
            return vp.load(backbone, adapter)
        return vp.attach(backbone, self.method_config())

    def method_config(self) -> Any:
        """The run's method config, with the head of ``train.recipe`` offered (:data:`RECIPE_HEADS`)."""
        head = RECIPE_HEADS.get(self.run.train.recipe or "")
        if head is None:
            return self.run.method
        return offer(self.run.method, self.run.method_keys, head=head)

    def _check_image_size(self, vit: nn.Module) -> int:
        """The input size: ``data.image_size`` (checked against the model's) or the model's own."""
        expected = tuple(vit.patch_embed.img_size) if vit.patch_embed.img_size is not None else None
        size = self.data.image_size
        if size is None:
            return expected[0] if expected is not None else 224
        if expected is not None and not getattr(vit, "dynamic_img_size", False) and expected != (size, size):
            raise ConfigError(
                f"data.image_size: {size} does not match the model's input size {expected[0]}; set "
                f"data.image_size: {expected[0]} (or remove it), or model.kwargs.img_size: {size} (timm resamples the "
                "position embedding of pretrained weights)"
            )
        return size

    def _check_labels(self, dataset: Dataset, split: str) -> None:
        limit = self.data.num_classes
        if limit is None:
            return
        labels = [label for _, label in getattr(dataset, "samples", [])]
        if labels and max(labels) >= limit:
            raise ConfigError(
                f"data.num_classes: {limit} is too small for label {max(labels)} of split {split!r}; "
                "remove it to size the head from the data"
            )

    # -- training --

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    def evaluate(self, model: nn.Module, batches: Any) -> dict[str, float]:
        """Correct predictions, samples and the summed cross-entropy over this process's batches."""
        correct = total = 0
        loss = 0.0
        for images, labels in batches:
            logits = model(images).float()
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
            total += labels.numel()
        return {"correct": correct, "samples": total, "loss_sum": loss}

    def summarize(self, totals: dict[str, float]) -> dict[str, Any]:
        """Top-1 accuracy, the mean loss per sample and the number of samples of the whole evaluation set."""
        total = int(totals.get("samples", 0))
        return {"top1": totals.get("correct", 0) / max(total, 1), "loss": totals.get("loss_sum", 0.0) / max(total, 1),
                "samples": total}

    def export(self, model: nn.Module, output_dir: str | os.PathLike) -> None:
        """Write ``results.json``: top-1 at the last evaluation and at the best one, labelled."""
        write_results(Path(output_dir))


def write_results(output_dir: Path) -> dict[str, Any]:
    """Summarise the evaluations in ``metrics.jsonl`` into ``results.json``.

    ``top1_last`` is the protocol of VPT (test accuracy at the last epoch); ``top1_best`` is the
    best evaluation of the run, as NOAH and V-PETL report it, and is labelled as such.
    """
    path = output_dir / "metrics.jsonl"
    evals = []
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "eval" in record and "top1" in record["eval"]:
                evals.append(record)
    results: dict[str, Any] = {"evaluations": len(evals)}
    if evals:
        best = max(evals, key=lambda r: r["eval"]["top1"])
        results.update(
            top1_last=evals[-1]["eval"]["top1"], last_step=evals[-1]["step"],
            top1_best=best["eval"]["top1"], best_step=best["step"],
            note="top1_last is the reported number (VPT protocol); top1_best is the best evaluation during the run",
        )
    from visionpeft.files import atomic_write_text

    atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    return results
