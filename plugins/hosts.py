"""Hosts: what the core knows of a model family.

A domain describes each model family it supports (timm ``VisionTransformer``, open_clip ``CLIP``,
diffusers ``UNet2DConditionModel``, ...) as a :class:`Host`: how to recognise it, which modules a
LoRA targets by default, where the classification head is. Generic methods (``lora``, ``bitfit``)
ask the host instead of knowing any library. Hosts are declared as entry points in the group
``visionpeft.hosts`` (each pointing to a ``Host`` or a list of them) and loaded on first lookup.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from visionpeft.errors import RegistryError, TrainingError

ENTRY_POINT_GROUP = "visionpeft.hosts"

_hosts: dict[str, Host] = {}
_lock = threading.RLock()
_entry_points_loaded = False


@dataclass(frozen=True)
class Host:
    """The description of one model family.

    Args:
        family: a stable name recorded in adapter files, e.g. ``"timm.VisionTransformer"``.
        matches: whether a model belongs to the family. It must not import heavy libraries
            unless the model's class comes from them.
        lora_targets: full-match regular expressions over qualified module names that a LoRA
            adapts by default.
        head: qualified name of the classification head that methods train for a new task,
            or ``None`` when the family has none.
        enable_gradient_checkpointing: turns activation checkpointing on, when the family has it.
        frozen_backbone_eval: whether a frozen backbone of this family stays in eval mode while
            the adapter trains (no backbone dropout or drop-path), as the original methods do.
        target_presets: named groups of full-match patterns (e.g. ``"unet_ff"``) that a generic
            method's ``targets`` may name as ``"@unet_ff"``, so users pick layer groups of a
            family without writing its module paths.
        untrained: qualified names of submodules that only ever run without gradients (Stable
            Diffusion's VAE encodes latents under ``no_grad``); generic methods leave their
            tensors alone, which would otherwise be trained tensors that never get a gradient.
        lora_export: ``lora_export(model, output_dir, run, adapter_name)`` writes a trained LoRA of this family
            in the formats its users' tools load (kohya's for Stable Diffusion); the generic
            ``lora`` method's :meth:`~visionpeft.method.Method.export` calls it. ``run`` is a
            :class:`~visionpeft.method.RunInfo`.
    """

    family: str
    matches: Callable[[nn.Module], bool]
    lora_targets: Sequence[str] = ()
    head: str | None = None
    enable_gradient_checkpointing: Callable[[nn.Module], None] | None = None
    frozen_backbone_eval: bool = False
    target_presets: Mapping[str, Sequence[str]] = field(default_factory=dict)
    untrained: Sequence[str] = ()
    lora_export: Callable[[nn.Module, Any, Any, str], None] | None = None


def register_host(host: Host) -> Host:
    """Register a model family; a second host with the same ``family`` is an error."""
    if not isinstance(host, Host):
        raise RegistryError(f"register_host expects a visionpeft.hosts.Host, got {host!r}")
    with _lock:
        existing = _hosts.get(host.family)
        if existing is not None and existing is not host:
            raise RegistryError(f"a host for family {host.family!r} is already registered")
        _hosts[host.family] = host
    return host


def unregister_host(family: str) -> None:
    """Remove a host (for tests and interactive sessions)."""
    with _lock:
        _hosts.pop(family, None)


def _ensure_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                loaded = ep.load()
            except ImportError:
                # The domain's library is not installed, so no model of that family can exist.
                continue
            for host in loaded if isinstance(loaded, (list, tuple)) else [loaded]:
                if host.family not in _hosts:
                    register_host(host)


def find_host(model: nn.Module) -> Host | None:
    """The registered host whose ``matches`` accepts ``model``, or ``None``."""
    _ensure_entry_points()
    with _lock:
        candidates = list(_hosts.values())
    for host in candidates:
        if host.matches(model):
            return host
    return None


def list_hosts() -> list[Host]:
    """Every registered host, sorted by family name."""
    _ensure_entry_points()
    with _lock:
        return sorted(_hosts.values(), key=lambda h: h.family)


def model_family(model: nn.Module) -> str:
    """The host family of ``model``, or its class's qualified name when no host knows it."""
    host = find_host(model)
    if host is not None:
        return host.family
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing in ``model``, through its host or the backbone library's own switch.

    The host is asked first (it knows its family's switch); else the model's timm
    (``set_grad_checkpointing``), diffusers (``enable_gradient_checkpointing``) or transformers
    (``gradient_checkpointing_enable``) method is called. Raises :class:`TrainingError` when the
    model has none.
    """
    host = find_host(model)
    if host is not None and host.enable_gradient_checkpointing is not None:
        host.enable_gradient_checkpointing(model)
        return
    for attr in ("set_grad_checkpointing", "enable_gradient_checkpointing", "gradient_checkpointing_enable"):
        hook = getattr(model, attr, None)
        if callable(hook):
            hook()
            return
    raise TrainingError(
        f"train.gradient_checkpointing: the backbone {type(model).__qualname__} offers none (its host has "
        "no enable_gradient_checkpointing and the model no set_grad_checkpointing / "
        "enable_gradient_checkpointing); set train.gradient_checkpointing: false"
    )
