"""Run configs: the YAML file behind ``visionpeft train`` and ``visionpeft eval``.

Sections: ``task`` (a registered task: ``vit``, ``vla``, ``diffusion``, ...), ``model``,
``method``, ``data``, ``train`` and ``output_dir``. Everything is validated at once, before any
model is built, and through one path: the method's keys by its ``Config`` dataclass, the ``data``
keys by the task's ``Data`` dataclass, the rest by the dataclasses here. A wrong key or value
raises :class:`~visionpeft.errors.ConfigError` with the key's path and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml

from visionpeft.config import MethodConfig, build_dataclass, field, plain, validate_fields
from visionpeft.errors import ConfigError
from visionpeft.files import read_text

SECTIONS = ("task", "model", "method", "data", "train", "output_dir")


class _Loader(yaml.SafeLoader):
    """YAML loader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


@dataclasses.dataclass
class ModelSection:
    """Which backbone to build: a library model name, pretrained weights or a local checkpoint."""

    name: str | None = field(None, help="the library's model name, e.g. vit_base_patch16_224.orig_in21k")
    pretrained: bool | str = field(False, help="load the library's pretrained weights (or a pretrained tag)")
    checkpoint: str | None = field(None, help="a local checkpoint file or folder, used instead of the hub")
    kwargs: dict[str, Any] = field({}, help="keyword arguments passed to the library's constructor")

    def __post_init__(self) -> None:
        validate_fields(self, "model.")


@dataclasses.dataclass
class TrainConfig:
    """The trainer's settings: schedule, optimizer, precision, logging and checkpoints."""

    epochs: int | None = field(None, help="passes over the training set (used when max_steps is unset)", ge=1)
    max_steps: int | None = field(None, help="optimizer steps in all; overrides epochs", ge=1)
    batch_size: int = field(32, help="samples per micro-batch on each process", ge=1)
    eval_batch_size: int | None = field(None, help="samples per evaluation batch (default: batch_size)", ge=1)
    recipe: str | None = field(None, help="a preset of the task's papers (e.g. vpt, noah); explicit keys win")
    lr: float = field(1e-3, help="peak learning rate (per 256 samples when scale_lr)", gt=0)
    scale_lr: bool = field(False, help="multiply lr by the total batch (all processes, accumulation) / 256")
    weight_decay: float = field(0.0, help="decoupled (AdamW) or L2 (SGD) weight decay", ge=0)
    optimizer: Literal["sgd", "adamw"] = field("adamw", help="optimizer over the trainable parameters")
    momentum: float = field(0.9, help="SGD momentum", ge=0, lt=1)
    betas: tuple[float, ...] = field((0.9, 0.999), help="AdamW betas", ge=0, lt=1)
    scheduler: Literal["cosine", "constant"] = field("cosine", help="learning-rate schedule after warmup")
    warmup_steps: int | None = field(None, help="warmup length in optimizer steps", ge=0)
    warmup_epochs: float | None = field(None, help="warmup length in epochs", ge=0)
    warmup_type: Literal["linear", "constant"] = field(
        "linear", help="linear: from 0 to lr; constant: warmup_lr throughout the warmup (Dassl's, as CoOp)"
    )
    warmup_lr: float = field(1e-5, help="the learning rate of a constant warmup", gt=0)
    schedule_unit: Literal["step", "epoch"] = field(
        "step", help="the learning rate changes every optimizer step, or once per epoch (Dassl, as CoOp)"
    )
    cosine_length: Literal["remaining", "total"] = field(
        "remaining", help="the cosine spans the run after warmup, or the whole run's length counted from the end "
        "of warmup (Dassl's: it never reaches min_lr)"
    )
    min_lr: float = field(0.0, help="learning rate at the end of the cosine schedule", ge=0)
    seed: int = field(0, help="seed of the model's init, data order and dropout", ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = field("fp32", help="autocast precision; trained tensors stay fp32")
    grad_accum: int = field(1, help="micro-batches per optimizer step", ge=1)
    max_grad_norm: float | None = field(None, help="clip the gradient norm to this value", gt=0)
    decay_all: bool = field(
        False, help="decay every trained tensor, biases and norms too (Dassl's recipe); otherwise tensors with "
        "ndim <= 1 and those a method names in no_weight_decay get none"
    )
    gradient_checkpointing: bool = field(False, help="recompute activations in backward (saves memory)")
    eval_every: int = field(0, help="evaluate every N optimizer steps (0: only at the end)", ge=0)
    save_every: int = field(0, help="checkpoint every N optimizer steps (0: only at the end)", ge=0)
    keep_last: int = field(2, help="checkpoints to keep", ge=1)
    log_every: int = field(10, help="write the training loss to metrics.jsonl every N steps", ge=1)
    num_workers: int = field(0, help="data-loading worker processes", ge=0)
    shuffle: bool = field(True, help="shuffle the training set each epoch")
    drop_last: bool = field(
        False, help="drop the last incomplete batch of each epoch (kept when it is the only one, as Dassl does)"
    )
    progress: bool = field(True, help="show tqdm progress bars")

    def __post_init__(self) -> None:
        validate_fields(self, "train.")
        if self.epochs is None and self.max_steps is None:
            raise ConfigError("train: set train.epochs or train.max_steps")
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ConfigError("train: set train.warmup_steps or train.warmup_epochs, not both")
        if self.optimizer == "adamw" and len(self.betas) != 2:
            raise ConfigError(f"train.betas: AdamW takes two betas, got {list(self.betas)}")


@dataclasses.dataclass
class RunConfig:
    """A whole validated run config.

    ``method`` is the method's validated config object (what ``vp.attach`` receives), ``data`` the
    task's validated ``Data`` section and ``task_class`` the task class that ``task`` names, looked
    up once.
    """

    task: str
    model: ModelSection
    method: MethodConfig
    data: Any
    train: TrainConfig
    output_dir: str
    task_class: type = dataclasses.field(default=None, compare=False, repr=False)
    #: the method keys the run config gives (``name`` aside), so a task can tell a value the user
    #: chose from a default it may fill in (:func:`visionpeft.config.offer`)
    method_keys: frozenset[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)

    def make_task(self) -> Any:
        """The task of this run (one instance per run: the trainer and the CLI share it)."""
        return self.task_class(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the resolved ``config.yaml`` of a run; parsing it gives this config again."""
        return {
            "task": self.task,
            "model": plain(self.model),
            # The keys the user gave, as given: a task fills the others (a default it may offer a value for).
            "method": {"name": self.method.method,
                       **{k: v for k, v in self.method.to_dict().items() if k in self.method_keys}},
            "data": self.data.to_dict(),
            "train": plain(self.train),
            "output_dir": self.output_dir,
        }


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"--set {dotted!r}: a key path is names joined by dots, e.g. train.lr")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a copy of ``tree``."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set train.lr=0.01")
        _set_path(tree, key.strip(), _yaml(raw) if raw.strip() else None)
    return tree


def parse_run_config(tree: Any) -> RunConfig:
    """Validate a run-config mapping: every section, then the task's and the method's own checks."""
    from visionpeft.api import config as method_config
    from visionpeft.registry import get_method
    from visionpeft.task import get_task

    if not isinstance(tree, dict):
        raise ConfigError(f"a run config is a mapping with the sections {list(SECTIONS)}, got {type(tree).__name__}")
    unknown = sorted(set(tree) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; a run config has {list(SECTIONS)}")
    for required in ("task", "method", "train"):
        if required not in tree:
            raise ConfigError(f"{required}: missing; a run config needs the sections task, method and train")
    if not isinstance(tree["task"], str):
        raise ConfigError(f"task: expected the name of a task, e.g. vit, got {tree['task']!r}")
    model = build_dataclass(ModelSection, tree.get("model") or {}, "model.")
    method = tree["method"]
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        raise ConfigError("method.name: missing; give the method's registry name, e.g. method: {name: lora}")
    try:
        method_cfg = method_config(method["name"], **{k: v for k, v in method.items() if k != "name"})
    except ConfigError as err:
        raise ConfigError(f"method: {err}") from err
    except ValueError as err:
        raise ConfigError(f"method.name: {err}") from err
    task_cls = get_task(tree["task"])
    train_tree = tree.get("train") or {}
    # A recipe may depend on the data (CoOp's epochs follow the shots), so it reads the validated
    # section; without one, the train keys are checked first.
    wants_recipe = isinstance(train_tree, dict) and train_tree.get("recipe") is not None
    data = build_dataclass(task_cls.Data, tree.get("data") or {}, "data.") if wants_recipe else None
    train = build_dataclass(TrainConfig, _with_recipe(task_cls, train_tree, data), "train.")
    if data is None:
        data = build_dataclass(task_cls.Data, tree.get("data") or {}, "data.")
    output_dir = tree.get("output_dir", "runs/run")
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(f"output_dir: expected a folder path, got {output_dir!r}")
    run = RunConfig(tree["task"], model, method_cfg, data, train, output_dir, task_class=task_cls,
                    method_keys=frozenset(method) - {"name"})
    task_cls.check_config(run)
    get_method(method_cfg.method).check_run(method_cfg, run)
    return run


def _with_recipe(task_cls: Any, train: Any, data: Any) -> Any:
    """The ``train`` section over the task's preset named by ``train.recipe`` (explicit keys win)."""
    if not isinstance(train, dict) or train.get("recipe") is None:
        return train
    recipes = getattr(task_cls, "recipes", {})
    name = train["recipe"]
    if not isinstance(name, str) or name not in recipes:
        raise ConfigError(f"train.recipe: {name!r} is not a recipe of task {task_cls.name!r}; choose one of "
                          f"{sorted(recipes) or 'none'}")
    return {**task_cls.recipe(name, data), **train}


def load_run_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides and validate it."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"run config {path} does not exist")
        try:
            tree = _yaml(read_text(path, ConfigError)) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
    return parse_run_config(apply_overrides(tree, overrides or []))
