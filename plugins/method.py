"""The base class of every method, and the record an attached adapter leaves on its model.

A method subclass declares ``name``, ``domain``, ``description`` and a ``Config`` dataclass and
implements :meth:`Method.attach`, :meth:`Method.detach` and :meth:`Method.trained_tensors`. One
instance is created per attached adapter and keeps what it needs to undo its changes. The
freezing policy, the bookkeeping of several adapters, saving and loading are done once, in
:mod:`visionpeft.api`, for every method.

Tasks and the trainer never ask which method they run; they ask the method through a few hooks
whose defaults do nothing: :meth:`Method.check_run` (refuse a run setting the method cannot use),
:meth:`Method.no_weight_decay` (trained tensors that get no weight decay), :meth:`Method.export`
(the files its users' tools read), :meth:`Method.train_modules` and :meth:`Method.loss_term` (a
term the trainer adds to the task's loss). What a method needs from a
task it declares as fields of its ``Config``: a task offers values (CLIP's class names, say) to
every config that has a field of that name (:func:`visionpeft.config.offer`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from visionpeft.config import MethodConfig
from visionpeft.errors import AdapterError, AdapterMismatchError
from visionpeft.hosts import find_host, list_hosts

STATE_ATTR = "_visionpeft_state"


class Method:
    """A parameter-efficient adaptation method.

    Class attributes:
        name: the registry name (``"lora"``).
        domain: ``"core"`` for generic methods, else ``"vit"``, ``"vla"`` or ``"diffusion"``.
        description: one line for ``visionpeft methods``.
        Config: the :class:`~visionpeft.config.MethodConfig` subclass with the paper's defaults.
        mergeable: whether :meth:`merge` can fold the adapter into the base weights.
        freezes_base: whether the base model's parameters are frozen when the method attaches.
        starts_as_identity: whether the adapted model's output equals the base model's at attach
            (zero-initialised adapters); the conformance suite checks it.
        trains: whether the method has tensors to train; ``False`` for baselines such as
            zero-shot classifiers, whose saved adapter is only their config.
    """

    name: ClassVar[str] = ""
    domain: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]]
    mergeable: ClassVar[bool] = False
    freezes_base: ClassVar[bool] = True
    starts_as_identity: ClassVar[bool] = False
    trains: ClassVar[bool] = True

    def __init__(self, config: MethodConfig, adapter_name: str = "default") -> None:
        self.config = config
        self.adapter_name = adapter_name

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether this method can adapt ``model``; by default, whether a host knows its family."""
        return find_host(model) is not None

    @classmethod
    def supported_families(cls) -> list[str]:
        """Names of the model families this method adapts, for error messages."""
        return [h.family for h in list_hosts()]

    def attach(self, model: nn.Module) -> nn.Module:
        """Insert the adapter's modules and parameters into ``model``; return the model to use.

        New parameters must require gradients; the caller freezes the base afterwards when
        :attr:`freezes_base` is set.
        """
        raise NotImplementedError

    def detach(self, model: nn.Module) -> nn.Module:
        """Remove everything :meth:`attach` inserted and return the original model."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the adapter into the base weights and remove its modules; return the model."""
        raise AdapterError(f"method {self.name!r} cannot be merged into the base weights; use vp.detach")

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The live tensors this adapter trains, keyed without the adapter name.

        These are the tensors saved in ``adapter.safetensors`` and filled by
        :meth:`load_trained_tensors`.
        """
        raise NotImplementedError

    def load_trained_tensors(self, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy saved tensors into the adapter; keys and shapes must match exactly."""
        live = self.trained_tensors(model)
        missing = sorted(set(live) - set(tensors))
        unexpected = sorted(set(tensors) - set(live))
        wrong = sorted(k for k in set(live) & set(tensors) if tuple(live[k].shape) != tuple(tensors[k].shape))
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing from the file: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if unexpected:
                parts.append(f"not in this adapter: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
            if wrong:
                parts.append(
                    "shape differs: "
                    + ", ".join(f"{k} {tuple(tensors[k].shape)} vs {tuple(live[k].shape)}" for k in wrong[:5])
                )
            raise AdapterMismatchError(
                f"the saved {self.name!r} tensors do not fit this adapter ({'; '.join(parts)}); was it "
                "saved with another config or base model?"
            )
        with torch.no_grad():
            for k, t in live.items():
                t.copy_(tensors[k])

    @classmethod
    def check_run(cls, config: MethodConfig, run: Any) -> None:
        """Refuse settings of the run config ``run`` that this method cannot train with.

        Called after the task has checked its own keys, before any model is built; raise
        :class:`~visionpeft.errors.ConfigError` naming the run-config key (``method.csc``,
        ``data.setting``) and what to do. The default accepts every run.
        """

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        """Qualified names (in ``model``) of trained tensors that get no weight decay.

        timm's convention: the trainer decays every trained tensor of two or more dimensions
        except these (and everything when the recipe decays all, as Dassl's does). The default
        names none, as most original implementations decay every weight matrix.
        """
        return set()

    def export(self, model: nn.Module, output_dir: str | os.PathLike, run: RunInfo) -> None:
        """Write, into ``output_dir``, the files this method's users load in their own tools.

        Called by the trainer at the end of a run, beside ``adapter/`` (which every method gets).
        The default writes nothing.
        """

    def train_modules(self, model: nn.Module) -> list[nn.Module] | None:
        """The modules that train while the rest of the model stays in eval mode, or ``None``.

        ``None`` (the default) lets the whole model follow ``model.train()``. Methods whose host
        keeps a frozen backbone in eval mode (the original implementations do: no backbone
        dropout or drop-path) return their own modules here; see :func:`set_train_mode`.
        """
        return None

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """A term of this method's training objective to add to the task's loss, or ``None`` (the default).

        The trainer calls it once per training micro-batch, right after the task's loss (inside the
        same autocast), and adds the result: the objective is ``task loss + sum of the attached
        methods' terms``. The forward of that micro-batch has just run on ``model`` (the unwrapped
        adapted model), so a method may read what that forward computed instead of computing it again.
        """
        return None


def add_loss_terms(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` plus the :meth:`Method.loss_term` of every adapter attached to ``model`` (``loss`` if none has one)."""
    for method in attached_methods(model):
        term = method.loss_term(model)
        if term is not None:
            loss = loss + term
    return loss


@dataclass(frozen=True)
class RunInfo:
    """What an export may record of the run that trained the adapter.

    ``config`` is the validated :class:`~visionpeft.runconfig.RunConfig` (``None`` outside a run
    config) and ``step`` the optimizer step the weights come from.
    """

    config: Any = None
    step: int = 0


@dataclass
class Attachment:
    """One attached adapter: the method instance and what to restore when it is detached."""

    method: Method
    requires_grad: dict[int, bool]
    training: dict[str, bool]


@dataclass
class AdapterState:
    """What visionpeft records on an adapted model: the base model's identity and its adapters."""

    base: dict[str, Any]
    adapters: dict[str, Attachment] = field(default_factory=dict)


def set_train_mode(model: nn.Module, training: bool) -> None:
    """Put an adapted model in train or eval mode, honouring what its adapters train.

    In training, if every attached adapter names its :meth:`Method.train_modules`, the model is put
    in eval mode and only those modules train; an adapter that returns ``None`` (full fine-tuning,
    or a host without that convention) leaves the whole model in train mode.
    """
    model.train(training)
    state = get_state(model)
    if not training or state is None:
        return
    modules: list[nn.Module] = []
    for attachment in state.adapters.values():
        own = attachment.method.train_modules(model)
        if own is None:
            return
        modules.extend(own)
    model.eval()
    for module in modules:
        module.train()


def attached_methods(model: nn.Module) -> list[Method]:
    """The method instances attached to ``model``, oldest first (empty when none is)."""
    state = get_state(model)
    return [a.method for a in state.adapters.values()] if state is not None else []


def get_state(model: nn.Module) -> AdapterState | None:
    """The adapter record of ``model``, or ``None`` if nothing is attached."""
    return model.__dict__.get(STATE_ATTR)


def set_state(model: nn.Module, state: AdapterState | None) -> None:
    """Store (or clear, with ``None``) the adapter record on ``model``."""
    if state is None or not state.adapters:
        model.__dict__.pop(STATE_ATTR, None)
    else:
        model.__dict__[STATE_ATTR] = state
