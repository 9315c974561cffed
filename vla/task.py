"""The ``vla`` task: prompt learning for open_clip CLIP with the protocol of the CoOp papers.

A run config with ``task: vla`` names an open_clip model, a method that classifies by class names
(``coop``, ``cocoop``, ``maple``, ``zeroshot``, or any other whose config takes ``classnames``) and
a data set; the class names come from the data.
Data keys:

* ``format``: ``coop`` (CoOp's folder layout and ``split_zhou_*.json`` files under ``root``, one
  of the 11 data sets named by ``dataset``) or ``imagefolder`` (``root/{train,val,test}/<class>/``).
* ``setting``: ``fewshot`` (train and test on all classes) or ``base2novel`` (train on the base
  half of the classes, report base and novel accuracy and their harmonic mean).
* ``shots``: images per class for training (16; ``-1`` for all), sampled as Dassl does with the
  run's ``train.seed`` (the papers use seeds 1, 2, 3); validation gets ``min(shots, 4)``.
* ``eval_split`` (``test`` or ``val``), ``image_size`` (default: the model's), ``skip_bad``,
  ``allow_fewer`` (keep a class with fewer images than ``shots`` whole, as Dassl does).

The task trains any method whose config takes ``classnames``: it offers every method config the
data set's ``classnames``, the model's ``tokenizer`` and the ``dataset`` name (for the fields a
config declares and the user left unset; :func:`visionpeft.config.offer`). It names no method.

Evaluation reports ``accuracy`` in percent (and ``base``, ``novel``, ``hm`` for base-to-novel)
and writes ``results.json`` in the run folder, one record that ``python -m
visionpeft.vla.summary`` averages over seeds and data sets. Learned contexts also get
``nearest_words.json``, the CoOp paper's interpretation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import visionpeft as vp
from visionpeft.config import declares, field, offer
from visionpeft.errors import ConfigError
from visionpeft.files import atomic_write_text
from visionpeft.registry import get_method, list_methods
from visionpeft.task import DataConfig, Task

logger = logging.getLogger("visionpeft")

FORMATS = ("coop", "imagefolder")
#: what a YAML user does about an unreadable image
SKIP_HINT = "set data.skip_bad: true"


@dataclasses.dataclass
class VlaData(DataConfig):
    """The ``data`` keys of the vla task."""

    dataset: str | None = field(None, help="the CoOp data set (Caltech101, EuroSAT, ...); required for format coop")
    setting: Literal["fewshot", "base2novel"] = field(
        "fewshot", help="fewshot: all classes; base2novel: train on the base half, report base, novel and HM"
    )
    shots: int = field(16, help="training images per class (-1: all), sampled as Dassl does", ge=-1)
    image_size: int | None = field(None, help="input resolution; default: the model's", ge=1)
    skip_bad: bool = field(False, help="drop unreadable images instead of stopping")
    allow_fewer: bool = field(False, help="keep a class with fewer images than shots whole, as Dassl does")

    def check(self) -> None:
        self.require(FORMATS, "the folder holding the data sets ($DATA in CoOp's DATASETS.md)")
        if self.shots == 0:
            raise ConfigError("data.shots: 0 images per class trains nothing; give a number >= 1, or -1 for all")
        if self.train_split is not None:
            raise ConfigError("data.train_split: the vla task trains on the few-shot sample of the data set's own "
                              "training split (data.shots); remove it")
        if self.eval_split not in (None, "test", "val", "none"):
            raise ConfigError(f"data.eval_split: {self.eval_split!r}; choose test, val or none")
        if self.format == "coop":
            from visionpeft.vla.data import canonical_dataset

            if self.dataset is None:
                raise ConfigError("data.dataset: missing; name one of CoOp's data sets, e.g. Caltech101")
            try:
                canonical_dataset(self.dataset)
            except ValueError as err:
                raise ConfigError(f"data.dataset: {err}") from err


def class_name_methods() -> list[str]:
    """The registered methods whose config takes ``classnames``: the ones this task can train."""
    return [m.name for m in list_methods() if declares(get_method(m.name).Config, "classnames")]


# Dassl's optimisation, shared by the three papers: SGD (momentum 0.9, weight decay 5e-4 on every
# tensor), cosine stepped per epoch after one constant warmup epoch at 1e-5, the last incomplete
# batch dropped, test batches of 100.
_DASSL = {
    "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "decay_all": True, "scheduler": "cosine",
    "warmup_epochs": 1, "warmup_type": "constant", "warmup_lr": 1e-5, "schedule_unit": "epoch",
    "cosine_length": "total", "drop_last": True, "eval_batch_size": 100,
}
RECIPES: dict[str, dict[str, Any]] = {
    # CoOp (IJCV): lr 0.002, batch 32; epochs by shots (see coop_epochs).
    "coop": {**_DASSL, "lr": 0.002, "batch_size": 32},
    # CoCoOp: lr 0.002, batch 1 as in the paper, 10 epochs.
    "cocoop": {**_DASSL, "lr": 0.002, "batch_size": 1, "epochs": 10},
    # MaPLe: lr 0.0035, batch 4, 5 epochs.
    "maple": {**_DASSL, "lr": 0.0035, "batch_size": 4, "epochs": 5},
}


def coop_epochs(shots: int, dataset: str | None) -> int:
    """CoOp's epochs: 50 for 1 shot, 100 for 2 and 4, 200 for 8, 16 (and all data); ImageNet always 50."""
    if dataset is not None and dataset.lower() == "imagenet":
        return 50
    if shots == 1:
        return 50
    if shots in (2, 4):
        return 100
    return 200


class VlaTask(Task):
    """Open-vocabulary classification with a prompted open_clip model."""

    name = "vla"
    Data = VlaData
    recipes: ClassVar[dict[str, dict[str, Any]]] = RECIPES

    @classmethod
    def recipe(cls, name: str, data: Any) -> dict[str, Any]:
        preset = dict(cls.recipes[name])
        if name == "coop":
            preset["epochs"] = coop_epochs(data.shots, data.dataset)
        return preset

    @classmethod
    def check_config(cls, run: Any) -> None:
        if not run.model.name:
            raise ConfigError("model.name: missing; give an open_clip architecture, e.g. ViT-B-16")
        method = run.method
        if not declares(type(method), "classnames"):
            raise ConfigError(
                f"method.name: {method.method!r} does not classify images by class names (its config takes no "
                f"classnames); the vla task trains {class_name_methods()}"
            )
        if "classnames" in run.method_keys:
            raise ConfigError("method.classnames: the class names come from the data set; remove the key")

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.data: VlaData = run.data
        self.setting = self.data.setting
        self.shots = self.data.shots
        self._splits: Any = None
        self._model: nn.Module | None = None
        self._datasets: dict[str, Dataset] = {}

    # -- data --

    @property
    def dataset_name(self) -> str | None:
        """The CoOp name of the data set (``None`` for an image folder without ``dataset``)."""
        from visionpeft.vla.data import canonical_dataset

        name = self.data.dataset
        return canonical_dataset(name) if name is not None else None

    def splits(self) -> dict[str, Any]:
        """The protocol's splits: ``train`` (few-shot, base classes for base-to-novel), ``eval``, ``novel``."""
        if self._splits is not None:
            return self._splits
        from visionpeft.vla import data, fewshot

        root = Path(self.data.root)
        if self.data.format == "coop":
            full = data.load_dataset(self.dataset_name, root, check_files=not self.data.skip_bad, skip_hint=SKIP_HINT)
        else:
            evaluate = None if self.data.eval_split == "none" else self.data.eval_split or "test"
            full = data.imagefolder_splits(root, dataset=self.dataset_name, evaluate=evaluate)
        # A method that trains nothing (the zero-shot baseline) draws no few-shot set.
        shots = self.shots if get_method(self.run.method.method).trains else -1
        sampled = fewshot.fewshot_splits(
            full, shots, seed=self.run.train.seed, allow_fewer=self.data.allow_fewer,
            fewer_hint="lower data.shots, or set data.allow_fewer: true to keep the class whole (as CoOp does)",
        )
        splits: dict[str, Any] = {}
        if self.setting == "base2novel":
            splits["train"] = fewshot.base_novel_splits(sampled, "base")
            splits["novel"] = fewshot.base_novel_splits(sampled, "new")
        else:
            splits["train"] = sampled
        self._splits = splits
        return splits

    def classnames(self) -> list[str]:
        """The class names the model is trained on (the base classes for base-to-novel)."""
        return list(self.splits()["train"].classnames)

    def _transform(self, train: bool):
        from visionpeft.vla.transforms import build_transform, model_preprocess

        size, mean, std = model_preprocess(self._model.clip if hasattr(self._model, "clip") else self._model)
        return build_transform(train, self.data.image_size or size, mean, std)

    def _dataset(self, key: str, items: list, train: bool) -> Dataset:
        from visionpeft.vla.data import ImageDataset

        if key not in self._datasets:
            if self._model is None:
                raise ConfigError("build the model before the data: the transform uses the model's preprocessing")
            self._datasets[key] = ImageDataset(items, self._transform(train), skip_bad=self.data.skip_bad,
                                               skip_hint=SKIP_HINT, source=f"{self.data.root} ({key})")
        return self._datasets[key]

    def train_dataset(self) -> Dataset:
        return self._dataset("train", self.splits()["train"].train, train=True)

    def _eval_items(self, splits: Any) -> list:
        return splits.val if self.data.eval_split == "val" else splits.test

    def eval_dataset(self) -> Dataset | None:
        if self.data.eval_split == "none":
            return None
        return self._dataset("eval", self._eval_items(self.splits()["train"]), train=False)

    # -- model --

    def build_model(self, adapter: str | os.PathLike | None = None) -> nn.Module:
        from visionpeft.vla.models import load_clip

        model_cfg = self.run.model
        # Seeded, so a randomly initialised model and the random context init are the same for a
        # given seed (at training and at evaluation), as in the original.
        torch.manual_seed(self.run.train.seed)
        clip = load_clip(model_cfg.name, pretrained=model_cfg.pretrained or None, checkpoint=model_cfg.checkpoint,
                         **model_cfg.kwargs)
        classnames = self.classnames()
        if adapter is not None:
            model = vp.load(clip, adapter)
            if not hasattr(model, "set_classnames"):
                raise ConfigError(f"--adapter {adapter}: its method does not classify images by class names; the vla "
                                  f"task evaluates {class_name_methods()}")
            model.set_classnames(classnames)
        else:
            # The model's own tokenizer (open_clip knows it by the model's name).
            tokenizer = None if model_cfg.name.startswith(("local-dir:", "hf-hub:")) else model_cfg.name
            config = offer(self.run.method, self.run.method_keys, classnames=classnames, tokenizer=tokenizer,
                           dataset=self.dataset_name)
            model = vp.attach(clip, config)
        self._model = model
        return model

    # -- training and evaluation --

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    @staticmethod
    def _counts(model: nn.Module, batches: Any) -> tuple[int, int]:
        correct = total = 0
        for images, labels in batches:
            logits = model(images)
            correct += int((logits.argmax(-1) == labels).sum())
            total += labels.numel()
        return correct, total

    def evaluate(self, model: nn.Module, batches: Any) -> dict[str, float]:
        """Correct predictions and samples over this process's batches (and of the novel classes' for base-to-novel)."""
        correct, total = self._counts(model, batches)
        totals = {"correct": correct, "samples": total}
        if self.setting == "base2novel":
            totals["novel_correct"], totals["novel_samples"] = self._novel_counts(model)
        return totals

    def summarize(self, totals: dict[str, float]) -> dict[str, Any]:
        """Accuracy in percent; for base-to-novel also ``base``, ``novel`` and their harmonic mean ``hm``."""
        total = int(totals.get("samples", 0))
        accuracy = 100.0 * totals.get("correct", 0) / max(total, 1)
        metrics: dict[str, Any] = {"accuracy": accuracy, "samples": total}
        if self.setting == "base2novel":
            from visionpeft.vla.summary import harmonic_mean

            novel = int(totals.get("novel_samples", 0))
            metrics["base"] = accuracy
            metrics["novel"] = 100.0 * totals.get("novel_correct", 0) / max(novel, 1)
            metrics["novel_samples"] = novel
            metrics["hm"] = harmonic_mean(metrics["base"], metrics["novel"])
        return metrics

    def write_evaluation(self, model: nn.Module, metrics: dict[str, Any]) -> None:
        """``results.json``: the record of this evaluation that ``python -m visionpeft.vla.summary`` reads."""
        self._write_results(metrics)

    def no_evaluation(self) -> str:
        return "data.eval_split: none turns evaluation off; set data.eval_split: test (or val)"

    def _novel_counts(self, model: nn.Module) -> tuple[int, int]:
        """This process's share of the novel classes' test images, classified among the novel class names only."""
        novel = self.splits()["novel"]
        dataset = self._dataset("novel", self._eval_items(novel), train=False)
        base_names = model.classnames
        model.set_classnames(novel.classnames)
        try:
            return self._counts(model, self.eval_batches(dataset))
        finally:
            model.set_classnames(base_names)

    def _write_results(self, metrics: dict[str, Any]) -> None:
        record = {
            "method": self.run.method.method, "dataset": self.dataset_name or str(self.data.root),
            "seed": self.run.train.seed, "setting": self.setting, "shots": self.shots, "step": self.step,
            "eval_split": self.data.eval_split or "test",
        }
        keys = ("base", "novel", "hm") if self.setting == "base2novel" else ("accuracy",)
        record.update({k: metrics[k] for k in keys})
        out = Path(self.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.json", json.dumps(record, indent=2) + "\n")

