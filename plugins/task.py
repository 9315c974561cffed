"""Tasks: what a domain gives the shared trainer and CLI.

A task turns the ``model``, ``method`` and ``data`` sections of a run config into an adapted
model, datasets, a loss and an evaluation. Domains declare their task classes as entry points in
the group ``visionpeft.tasks`` under the name used in a run config's ``task`` key (``vit``,
``vla``, ``diffusion``).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from visionpeft.errors import ConfigError

ENTRY_POINT_GROUP = "visionpeft.tasks"
INSTALL_HINT = {"vit": "vit", "vla": "vla", "diffusion": "diffusion"}

_tasks: dict[str, type[Task]] = {}


class Task:
    """The domain side of a training run.

    A task is built from the validated run config (a :class:`~visionpeft.runconfig.RunConfig`).
    :meth:`check_config` runs before any model is built and must reject wrong ``data`` and
    ``model`` keys with the key's path. The trainer then calls, in order: :meth:`build_model`,
    :meth:`train_dataset`, :meth:`eval_dataset`, and per batch :meth:`loss`; :meth:`evaluate`
    every ``eval_every`` steps; :meth:`export` at the end.
    """

    name: str = ""
    #: presets of ``train`` keys from the domain's papers, selected with ``train.recipe``
    recipes: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, run: Any) -> None:
        self.run = run
        #: the trainer's optimizer step, set before each :meth:`evaluate` call
        self.step = 0

    @classmethod
    def recipe(cls, name: str, tree: Mapping[str, Any]) -> dict[str, Any]:
        """The ``train`` keys of preset ``name``; ``tree`` is the whole run config, for presets that
        depend on the data (CoOp's epochs follow the number of shots)."""
        return dict(cls.recipes[name])

    @classmethod
    def check_config(cls, run: Any) -> None:
        """Validate the domain's keys of ``run``; raise :class:`ConfigError` naming the key path."""

    def build_model(self, adapter: str | os.PathLike | None = None) -> nn.Module:
        """Build the backbone and attach the method; return the model to use.

        With ``adapter``, load that saved adapter (``vp.load``) instead of attaching a new one.
        """
        raise NotImplementedError

    def train_dataset(self) -> Dataset:
        """The training set; items are collated by :meth:`collate`."""
        raise NotImplementedError

    def eval_dataset(self) -> Dataset | None:
        """The evaluation set, or ``None`` when the task has none."""
        return None

    collate: Callable[[list[Any]], Any] | None = None

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of one batch (already on the model's device)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches: Any) -> dict[str, float]:
        """Metrics over an iterable of evaluation batches, e.g. ``{"top1": 0.81}``."""
        return {}

    def export(self, model: nn.Module, output_dir: str | os.PathLike) -> None:
        """Write the formats the domain's users load (beside ``adapter/``); default: nothing."""


def register_task(cls: type[Task]) -> type[Task]:
    """Register a task class under its ``name`` (class decorator)."""
    if not cls.name:
        raise ConfigError(f"task class {cls.__qualname__} needs a `name`")
    _tasks[cls.name] = cls
    return cls


def unregister_task(name: str) -> None:
    """Remove a task (for tests)."""
    _tasks.pop(name, None)


def available_tasks() -> list[str]:
    """Names of the registered and declared tasks."""
    names = set(_tasks) | {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)


def get_task(name: str) -> type[Task]:
    """The task class for a run config's ``task`` value, with an install hint if it is missing."""
    if name in _tasks:
        return _tasks[name]
    eps: Mapping[str, importlib.metadata.EntryPoint] = {
        ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    }
    if name in eps:
        try:
            return register_task(eps[name].load())
        except ImportError as err:
            extra = INSTALL_HINT.get(name, "all")
            raise ConfigError(
                f"task: {name!r} needs libraries that are not installed ({err}); pip install 'visionpeft[{extra}]'"
            ) from err
    if name in INSTALL_HINT:
        raise ConfigError(
            f"task: {name!r} is not available in this installation yet (no package provides it); "
            f"available tasks: {available_tasks() or 'none'}"
        )
    raise ConfigError(f"task: {name!r} is unknown; choose one of {sorted(INSTALL_HINT)}")
