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
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from visionpeft.config import Section, field
from visionpeft.errors import ConfigError, TrainingError

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

    def require(self, formats: Sequence[str], root: str) -> None:
        """Refuse a missing or unknown ``format`` (one of ``formats``) and a missing ``root`` (``root``
        says what the folder is), the checks every folder-reading task starts with."""
        if self.format is None:
            raise ConfigError(f"data.format: missing; choose one of {list(formats)}")
        if self.format not in formats:
            raise ConfigError(f"data.format: {self.format!r} is not supported; choose one of {list(formats)}")
        if self.root is None:
            raise ConfigError(f"data.root: missing; give {root}")


class Task:
    """The domain side of a training run.

    A task is built from the validated run config (a :class:`~visionpeft.runconfig.RunConfig`),
    whose ``data`` is an instance of the task's :attr:`Data` dataclass. :meth:`check_config` runs
    before any model is built, for the rules that span sections (a ``model`` key the domain needs,
    what the method takes from the data). The trainer then calls, in order: :meth:`build_model`,
    :meth:`train_dataset`, :meth:`eval_dataset`, and per batch :meth:`loss`; an evaluation every
    ``eval_every`` steps and at the end; :meth:`export` at the end.

    An evaluation is three calls, so that it splits over processes without the trainer knowing a
    metric's formula: :meth:`evaluate` on every process, over that process's share of the
    evaluation batches, returns totals that add up (counts and sums, never ratios); the trainer
    sums each total over the processes; :meth:`summarize` turns the sums into the reported metrics
    (the same on every process); :meth:`write_evaluation` writes the evaluation's files on the main
    process only. A task that evaluates a second data set (the vla task's novel classes) gets this
    process's share of its batches from :meth:`eval_batches`.
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

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        """Totals over ``batches``, this process's share of the evaluation batches, that add up over processes.

        Counts and sums, never ratios (``{"correct": 81, "samples": 100, "loss_sum": 52.3}``): the
        trainer sums each key over the processes and hands the sums to :meth:`summarize`, so a run on
        N processes reports what one process would. A process may get no batch: return zeros then.
        """
        return {}

    def summarize(self, totals: dict[str, float]) -> dict[str, Any]:
        """The reported metrics from the totals of :meth:`evaluate` summed over every process.

        For example ``top1 = correct / samples``. It runs on every process with the same totals and
        writes nothing; the default reports the totals themselves.
        """
        return dict(totals)

    def write_evaluation(self, model: nn.Module, metrics: dict[str, Any]) -> None:
        """Write the files of one evaluation (``results.json``, sample grids); default: nothing.

        The trainer calls it on the main process only, after :meth:`summarize`, with :attr:`step` set.
        """

    def eval_batches(self, dataset: Dataset) -> Iterable[Any]:
        """This process's share of ``dataset``'s evaluation batches, collated and on the model's device.

        For a second evaluation set inside :meth:`evaluate`; the trainer provides it (batched like
        the evaluation set), so this default only says where it comes from.
        """
        raise TrainingError("Task.eval_batches is provided by the trainer (visionpeft.train.Trainer) while it "
                            "evaluates; call Trainer.evaluate instead of Task.evaluate")

    def no_evaluation(self) -> str:
        """Why this run has no evaluation set and how to get one, in the task's own keys (for ``visionpeft eval``)."""
        return f"the {self.name or type(self).__name__} task has no evaluation for this run config"

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
