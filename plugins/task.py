"""Tasks: what a domain gives the shared trainer and CLI.

A task turns the ``model``, ``method`` and ``data`` sections of a run config into an adapted
model, datasets, a loss and an evaluation. Domains declare their task classes as entry points in
the group ``visionpeft.tasks`` under the name used in a run config's ``task`` key (this package
declares ``vit``, ``vla`` and ``diffusion`` there, as any other package would). A task declares its
``data`` keys as a :class:`DataConfig` dataclass; it never names a method: what a method needs
from it, the method declares (see :mod:`visionpeft.method`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from visionpeft.config import Section, field
from visionpeft.errors import ConfigError

ENTRY_POINT_GROUP = "visionpeft.tasks"

_tasks: dict[str, type[Task]] = {}


@dataclasses.dataclass
class DataConfig(Section):
    """The ``data`` keys of a run config: where the data is; tasks subclass it with their own keys."""

    prefix = "data."

    format: str | None = field(None, help="the data format, e.g. vtab, fgvc, imagefolder")
    root: str | None = field(None, help="the data set's root folder")
    train_split: str | None = field(None, help="the split to train on")
    eval_split: str | None = field(None, help="the split to evaluate on")


class Task:
    """The domain side of a training run.

    A task is built from the validated run config (a :class:`~visionpeft.runconfig.RunConfig`),
    whose ``data`` is an instance of the task's :attr:`Data` dataclass. :meth:`check_config` runs
    before any model is built, for the rules that span sections (a ``model`` key the domain needs,
    what the method takes from the data). The trainer then calls, in order: :meth:`build_model`,
    :meth:`train_dataset`, :meth:`eval_dataset`, and per batch :meth:`loss`; :meth:`evaluate`
    every ``eval_every`` steps; :meth:`export` at the end.
    """

    name: str = ""
    #: the dataclass of the task's ``data`` keys (defaults, types, bounds), validated with the run config
    Data: ClassVar[type[Section]] = DataConfig
    #: presets of ``train`` keys from the domain's papers, selected with ``train.recipe``
    recipes: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, run: Any) -> None:
        self.run = run
        #: the trainer's optimizer step, set before each :meth:`evaluate` call
        self.step = 0

    @classmethod
    def recipe(cls, name: str, data: Any) -> dict[str, Any]:
        """The ``train`` keys of preset ``name``; ``data`` is the run's validated :attr:`Data` section,
        for presets that depend on the data (CoOp's epochs follow the number of shots)."""
        return dict(cls.recipes[name])

    @classmethod
    def check_config(cls, run: Any) -> None:
        """Check what spans ``run``'s sections; raise :class:`ConfigError` naming the key path.

        The ``data`` section has already been validated by :attr:`Data`; ask the method (its
        class, its config's fields) rather than its name.
        """

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
        """Write the task's own files at the end of a run (``results.json``); default: nothing.

        The files of the method (a LoRA in kohya's format, say) are the method's
        :meth:`~visionpeft.method.Method.export`, which the trainer calls as well.
        """


def register_task(cls: type[Task]) -> type[Task]:
    """Register a task class under its ``name`` (class decorator)."""
    if not cls.name:
        raise ConfigError(f"task class {cls.__qualname__} needs a `name`")
    _tasks[cls.name] = cls
    return cls


def unregister_task(name: str) -> None:
    """Remove a task (for tests)."""
    _tasks.pop(name, None)


def _declared() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_tasks() -> list[str]:
    """Names of the registered and declared tasks."""
    return sorted(set(_tasks) | set(_declared()))


def _install_hint(ep: importlib.metadata.EntryPoint) -> str:
    """How to install what the entry point's package needs: its extra of that name, if it has one."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "install the libraries it needs"
    extras = dist.metadata.get_all("Provides-Extra") or []
    extra = ep.name if ep.name in extras else "all" if "all" in extras else None
    return f"pip install '{dist.name}[{extra}]'" if extra else f"reinstall {dist.name} with its dependencies"


def get_task(name: str) -> type[Task]:
    """The task class for a run config's ``task`` value, with an install hint if its libraries are missing."""
    if name in _tasks:
        return _tasks[name]
    declared = _declared()
    if name in declared:
        try:
            return register_task(declared[name].load())
        except ImportError as err:
            raise ConfigError(
                f"task: {name!r} needs libraries that are not installed ({err}); {_install_hint(declared[name])}"
            ) from err
    others = sorted(set(_tasks) - set(declared))
    extra = f" or one registered here: {others}" if others else ""
    raise ConfigError(f"task: {name!r} is unknown; choose one of {sorted(declared) or 'none installed'}{extra}")
