"""The ``vit`` task: image and video classification with an adapted timm ViT.

A run config with ``task: vit`` names a timm model, a method and a data set in one of the formats
below; the shared trainer does the rest. Data options by format:

* ``vtab``: ``root`` is a VTAB-1k task folder (or the VTAB-1k root with ``vtab_task``); splits
  ``train800``, ``val200``, ``train800val200``, ``test``; resize to ``image_size``, no augmentation.
* ``fgvc``: ``root`` holds ``train.json`` / ``val.json`` / ``test.json``; ``dataset`` picks the
  image root (CUB, NABirds, StanfordDogs, OxfordFlowers, StanfordCars); resize 256 → random crop
  224 + flip for training, center crop for evaluation.
* ``imagefolder``: ``root/<split>/<class>/<image>``.
* ``video``: ``root`` holds the frame folders, the splits are ``path label`` list files;
  ``num_frames``, ``sampling`` (``uniform`` or ``stride``), ``stride``.

Common options: ``image_size`` (224), ``normalization`` (``model``: the checkpoint's own
statistics, ``imagenet`` as VPT, ``inception``), ``transform`` (override the format's),
``skip_bad`` (drop unreadable images and report how many), ``num_classes`` (default: from the
data).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import visionpeft as vp
from visionpeft.errors import ConfigError
from visionpeft.runconfig import check_section
from visionpeft.task import Task

FORMATS: dict[str, dict[str, Any]] = {
    "vtab": {"train_split": "train800val200", "eval_split": "test", "transform": "vtab",
             "options": {"vtab_task"}},
    "fgvc": {"train_split": "train", "eval_split": "test", "transform": "fgvc", "options": {"dataset"}},
    "imagefolder": {"train_split": "train", "eval_split": "val", "transform": "fgvc", "options": set()},
    "video": {"train_split": "train.txt", "eval_split": "val.txt", "transform": "vtab",
              "options": {"num_frames", "sampling", "stride"}},
}
COMMON_OPTIONS = {"image_size", "normalization", "transform", "skip_bad", "num_classes"}
OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "image_size": (int,), "normalization": (str,), "transform": (str,), "skip_bad": (bool,),
    "num_classes": (int,), "vtab_task": (str,), "dataset": (str,), "num_frames": (int,), "sampling": (str,),
    "stride": (int,),
}
OPTION_CHOICES = {
    "normalization": ("model", "imagenet", "inception"),
    "transform": ("vtab", "fgvc", "none"),
    "sampling": ("uniform", "stride"),
}

# Presets of the papers' schedules, selected with `train.recipe`; explicit train keys win.
RECIPES: dict[str, dict[str, Any]] = {
    # KMnP/vpt: SGD with momentum, 10 warmup epochs then cosine, 100 epochs, lr = base_lr x batch / 256.
    "vpt": {"optimizer": "sgd", "momentum": 0.9, "scheduler": "cosine", "warmup_epochs": 10, "epochs": 100,
            "batch_size": 128, "weight_decay": 1e-4, "scale_lr": True},
    # NOAH / V-PETL Bench: AdamW lr 1e-3, weight decay 1e-4, batch 64, 100 epochs, 10 warmup, min lr 1e-5.
    "noah": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 64, "epochs": 100,
             "warmup_epochs": 10, "scheduler": "cosine", "min_lr": 1e-5},
}


class VitTask(Task):
    """Classification of images (or clips) with a timm ViT and any ``vit`` or generic method."""

    name = "vit"
    recipes: ClassVar[dict[str, dict[str, Any]]] = RECIPES

    @classmethod
    def check_config(cls, run: Any) -> None:
        if not run.model.name:
            raise ConfigError("model.name: missing; give a timm model name, e.g. vit_base_patch16_224.orig_in21k")
        fmt = run.data.format
        if fmt not in FORMATS:
            raise ConfigError(f"data.format: {fmt!r} is not supported; choose one of {sorted(FORMATS)}")
        if run.data.root is None:
            raise ConfigError("data.root: missing; give the data set's folder")
        allowed = COMMON_OPTIONS | FORMATS[fmt]["options"]
        check_section("data", run.data.options, {k: OPTION_TYPES[k] for k in allowed}, where=f" for format {fmt!r}")
        for key, value in run.data.options.items():
            if key in OPTION_CHOICES and value not in OPTION_CHOICES[key]:
                raise ConfigError(f"data.{key}: {value!r} is not allowed; choose one of {list(OPTION_CHOICES[key])}")

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.data = run.data
        self.fmt = FORMATS[run.data.format]
        self.options = dict(run.data.options)
        self._datasets: dict[str, Dataset] = {}
        self._model: nn.Module | None = None

    # -- data --

    def _transform(self, train: bool):
        from visionpeft.vit.transforms import build_transform, normalization_for

        mean, std = normalization_for(self._model, self.options.get("normalization", "model"))
        kind = self.options.get("transform", self.fmt["transform"])
        return build_transform(kind, train=train, image_size=self.options.get("image_size", 224), mean=mean, std=std)

    def _dataset(self, split: str, train: bool) -> Dataset:
        from visionpeft.vit import data

        if split in self._datasets:
            return self._datasets[split]
        root = Path(self.data.root)
        skip_bad = self.options.get("skip_bad", False)
        transform = self._transform(train)
        fmt = self.data.format
        if fmt == "vtab":
            if "vtab_task" in self.options:
                root = data.vtab_task_dir(root, self.options["vtab_task"])
            dataset = data.VTAB1k(root, split, transform=transform, skip_bad=skip_bad)
        elif fmt == "fgvc":
            dataset = data.FGVC(root, split, dataset=self.options.get("dataset"), transform=transform,
                                skip_bad=skip_bad)
        elif fmt == "imagefolder":
            dataset = data.ImageFolderDataset(root / split, transform=transform, skip_bad=skip_bad)
        else:
            dataset = data.VideoFrames(root, root / split, num_frames=self.options.get("num_frames", 8),
                                       sampling=self.options.get("sampling", "uniform"),
                                       stride=self.options.get("stride", 4), transform=transform, train=train,
                                       seed=self.run.train.seed, skip_bad=skip_bad)
        self._check_labels(dataset)
        self._datasets[split] = dataset
        return dataset

    def train_dataset(self) -> Dataset:
        return self._dataset(self.data.train_split or self.fmt["train_split"], train=True)

    def eval_dataset(self) -> Dataset | None:
        split = self.data.eval_split or self.fmt["eval_split"]
        if split in ("", "none"):
            return None
        return self._dataset(split, train=False)

    def num_classes(self) -> int:
        """The head's size: ``data.num_classes`` or the number of classes of the training split."""
        if "num_classes" in self.options:
            return self.options["num_classes"]
        return len(self.train_dataset().classes)

    # -- model --

    def build_model(self, adapter: str | os.PathLike | None = None) -> nn.Module:
        from visionpeft.vit.models import build_vit
        from visionpeft.vit.surface import find_vit
        from visionpeft.vit.video import VideoClassifier

        model_cfg = self.run.model
        self._model = None
        num_classes = self.num_classes() if "num_classes" in self.options else None
        if num_classes is None:
            # Reading the class list needs no transform, so the model is not needed yet.
            num_classes = self._class_count_without_model()
        # Seeded, so that a randomly initialised backbone (and the fresh head) is the same at
        # training and evaluation time.
        torch.manual_seed(self.run.train.seed)
        backbone = build_vit(model_cfg.name, num_classes, pretrained=model_cfg.pretrained,
                             checkpoint=model_cfg.checkpoint, **model_cfg.kwargs)
        self._model = backbone
        self._check_image_size(find_vit(backbone))
        if self.data.format == "video":
            backbone = VideoClassifier(backbone, self.options.get("num_frames", 8))
        if adapter is not None:
            return vp.load(backbone, adapter)
        method = {k: v for k, v in self.run.method.items() if k != "name"}
        return vp.attach(backbone, self.run.method["name"], **method)

    def _check_image_size(self, vit: nn.Module) -> None:
        size = self.options.get("image_size", 224)
        expected = tuple(vit.patch_embed.img_size) if vit.patch_embed.img_size is not None else None
        if expected is not None and not getattr(vit, "dynamic_img_size", False) and expected != (size, size):
            raise ConfigError(
                f"data.image_size: {size} does not match the model's input size {expected[0]}; set "
                f"data.image_size: {expected[0]}, or model.kwargs.img_size: {size} (timm resamples the position "
                "embedding of pretrained weights)"
            )

    def _check_labels(self, dataset: Dataset) -> None:
        if "num_classes" not in self.options:
            return
        labels = [label for _, label in getattr(dataset, "samples", [])]
        if labels and max(labels) >= self.options["num_classes"]:
            raise ConfigError(
                f"data.num_classes: {self.options['num_classes']} is too small for label {max(labels)} in the data; "
                "remove it to size the head from the data"
            )

    def _class_count_without_model(self) -> int:
        from visionpeft.vit import data

        root = Path(self.data.root)
        split = self.data.train_split or self.fmt["train_split"]
        fmt = self.data.format
        if fmt == "vtab":
            if "vtab_task" in self.options:
                root = data.vtab_task_dir(root, self.options["vtab_task"])
            return len(data.VTAB1k(root, split).classes)
        if fmt == "fgvc":
            return len(data.FGVC(root, split, dataset=self.options.get("dataset")).classes)
        if fmt == "imagefolder":
            return len(data.ImageFolderDataset(root / split).classes)
        return len(data.VideoFrames(root, root / split, num_frames=self.options.get("num_frames", 8)).classes)

    # -- training --

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    def evaluate(self, model: nn.Module, batches: Any) -> dict[str, float]:
        correct = total = 0
        loss = 0.0
        for images, labels in batches:
            logits = model(images).float()
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            total += labels.numel()
        return {"top1": correct / max(total, 1), "loss": loss / max(total, 1), "samples": total}

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
