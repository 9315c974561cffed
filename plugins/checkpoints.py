"""Training checkpoints: what a run needs to continue exactly where it stopped.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding the adapters (``adapter/``, as
``vp.save`` writes them), ``trainer_state.pt`` (optimizer, schedule, loss scaler, the RNG states of
every process, the data position, the running loss and the trained tensors no adapter saves) and
``trainer_state.json`` (a readable summary). Folders are written whole or not at all
(:func:`visionpeft.files.replace_folder`), so the newest complete one is always safe to resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visionpeft import files, tensorfiles
from visionpeft.api import save as save_adapter
from visionpeft.errors import AdapterMismatchError, TrainingError
from visionpeft.method import get_state

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
STATE_SUMMARY_FILE = "trainer_state.json"
ADAPTER_DIR = "adapter"
_CHECKPOINT_RE = re.compile(r"step-(\d+)")


# --- RNG states ---------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) global generators of this process."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        # Plain lists, so the state loads with torch.load(weights_only=True).
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators from :func:`rng_state`, so dropout and augmentations continue the same draws."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- trained tensors ----------------------------------------------------------------------------


def _adapter_names(model: nn.Module) -> list[str]:
    state = get_state(model)
    return list(state.adapters) if state is not None else []


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> bool:
    """``vp.save`` every attached adapter into ``directory`` (one subfolder per name if several).

    Returns ``False`` when the model carries no visionpeft adapter.
    """
    names = _adapter_names(model)
    directory = Path(directory)
    for name in names:
        save_adapter(model, directory if len(names) == 1 else directory / name, name)
    return bool(names)


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy the trained tensors that :func:`save_adapters` wrote into the adapters attached to ``model``.

    Unlike ``vp.load`` it attaches nothing: the run's model already carries the adapters, and the
    optimizer already holds their tensors.
    """
    directory = Path(directory)
    state = get_state(model)
    names = _adapter_names(model)
    for name in names:
        folder = directory if len(names) == 1 else directory / name
        try:
            payload, tensors = files.read_adapter(folder)
        except AdapterMismatchError as err:  # a damaged file; a tensor that does not fit is reported below
            raise TrainingError(f"resume: {err} ({_damaged_hint(directory.parent)})") from err
        method = state.adapters[name].method
        if payload["method"] != method.name:
            raise TrainingError(
                f"the checkpoint's adapter in {folder} is a {payload['method']!r}, but the model's adapter "
                f"{name!r} is a {method.name!r}; resume with the run config that wrote the checkpoint"
            )
        method.load_trained_tensors(model, tensors)


def extra_trainables(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters that no adapter saves, so a checkpoint must keep them itself."""
    state = get_state(model)
    covered = set()
    if state is not None:
        for attachment in state.adapters.values():
            covered |= {t.data_ptr() for t in attachment.method.trained_tensors(model).values()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and p.data_ptr() not in covered}


# --- checkpoint folders -------------------------------------------------------------------------


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """The folder of the checkpoint written after optimizer step ``step``."""
    return Path(output_dir) / CHECKPOINTS_DIR / f"step-{step:07d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first (temporary ``.tmp-*`` folders are ignored)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT_RE.fullmatch(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def write_checkpoint(
    path: Path,
    model: nn.Module,
    progress: Mapping[str, Any],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    rng: list[dict[str, Any]],
) -> Path:
    """Write the checkpoint folder ``path``, whole or not at all; returns ``path``.

    ``progress`` is the trainer's position (``step``, ``epoch``, ``batch``, ``total_steps``, the
    running loss, the data order); ``rng`` holds :func:`rng_state` of every process.
    """
    state = {
        **progress,
        "param_groups": param_group_names(model, optimizer),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "extra_tensors": {n: p.detach().cpu() for n, p in extra_trainables(model).items()},
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    # torch checks no checksum of its zip members: a flipped bit in the optimizer state would load.
    summary = {"step": progress["step"], "epoch": progress["epoch"], "batch_in_epoch": progress["batch"],
               "total_steps": progress["total_steps"], "lr": optimizer.param_groups[0]["lr"],
               "state_sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}

    def write(folder: Path) -> None:
        save_adapters(model, folder / ADAPTER_DIR)
        files.atomic_write_bytes(folder / STATE_FILE, buffer.getvalue())
        files.atomic_write_text(folder / STATE_SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")

    # The checkpoints folder holds nothing else, so every leftover of a crashed write is swept.
    return files.replace_folder(path, write, sweep=True)


def _damaged_hint(checkpoint: Path) -> str:
    return (f"the checkpoint is damaged: delete {checkpoint} to resume from the one before it, or start the run in a "
            "new output_dir")


def read_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The ``trainer_state.pt`` of a checkpoint folder, loaded without unpickling code.

    A damaged file (truncated, or holding what ``weights_only`` refuses) raises
    :class:`TrainingError` naming it and saying how to go on.
    """
    checkpoint = Path(checkpoint)
    state = tensorfiles.read_torch(checkpoint / STATE_FILE, error=TrainingError, key="resume",
                                   fix=_damaged_hint(checkpoint))
    # After the load, which names what is wrong with a file it cannot read; the checksum catches
    # the damage torch would load silently.
    _check_state_checksum(checkpoint)
    if not isinstance(state, dict):
        raise TrainingError(f"resume: {checkpoint / STATE_FILE} is not a trainer state; {_damaged_hint(checkpoint)}")
    return state


def _check_state_checksum(checkpoint: Path) -> None:
    """Refuse a ``trainer_state.pt`` that differs from the SHA-256 its ``trainer_state.json`` records.

    Checkpoints written before the checksum was recorded have none and are not checked; a summary
    that exists but does not parse is damage too.
    """
    summary = checkpoint / STATE_SUMMARY_FILE
    if not summary.is_file():
        return  # written before the summary existed
    try:
        recorded = json.loads(summary.read_text(encoding="utf-8")).get("state_sha256")
    except (ValueError, AttributeError) as err:
        raise TrainingError(f"resume: {summary} is damaged ({err}); {_damaged_hint(checkpoint)}") from err
    if recorded is None:
        return
    actual = hashlib.sha256((checkpoint / STATE_FILE).read_bytes()).hexdigest()
    if actual != recorded:
        raise TrainingError(f"resume: {checkpoint / STATE_FILE} does not match the checksum in {STATE_SUMMARY_FILE} "
                            f"(the file is damaged); {_damaged_hint(checkpoint)}")


def restore_checkpoint(
    checkpoint: str | os.PathLike,
    state: Mapping[str, Any],
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Put the checkpoint back in place: trained tensors, optimizer, schedule, loss scaler, RNG states.

    ``state`` is :func:`read_state` of ``checkpoint``; the trainer takes its position from it.
    Process ``rank`` gets its own RNG state when the run had as many processes, else the first.
    """
    saved, current = state.get("param_groups"), param_group_names(model, optimizer)
    if saved is not None and saved != current:
        raise TrainingError(f"resume: {_group_difference(saved, current)}; {_RESUME_HINT}")
    load_adapters(model, Path(checkpoint) / ADAPTER_DIR)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["extra_tensors"].items():
            if name not in params:
                raise TrainingError(f"resume: the checkpoint trains {name!r}, which this model lacks")
            params[name].copy_(tensor)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:  # a checkpoint from before the groups were recorded
        raise TrainingError(f"resume: the checkpoint's optimizer does not fit this run ({err}); "
                            f"{_RESUME_HINT}") from err
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    set_rng_state(rng[rank] if len(rng) == world_size else rng[0])


_RESUME_HINT = ("the trained tensors or their weight-decay groups changed (the method, its config, train.weight_decay "
                "or train.decay_all); resume with the run config that wrote the checkpoint, or start in a new "
                "output_dir")


def param_group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list[str]]:
    """The qualified names of the tensors in each of the optimizer's groups, by group label.

    Recorded in checkpoints so that a resume whose groups differ fails with the reason instead of
    loading moments onto other tensors (which ``load_state_dict`` would do when only sizes match).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    return {str(g.get("group", i)): [names.get(id(p), "?") for p in g["params"]]
            for i, g in enumerate(optimizer.param_groups)}


def _group_difference(saved: Mapping[str, list[str]], current: Mapping[str, list[str]]) -> str:
    parts = []
    for group in sorted(set(saved) | set(current)):
        before, now = saved.get(group, []), current.get(group, [])
        gone, new = [n for n in before if n not in now], [n for n in now if n not in before]
        changes = ([f"{len(gone)} tensor(s) no longer in it (e.g. {gone[0]})"] if gone else []) + (
            [f"{len(new)} new (e.g. {new[0]})"] if new else [])
        if changes:
            parts.append(f"group {group!r}: " + ", ".join(changes))
    return "the optimizer's groups differ from the checkpoint's (" + ("; ".join(parts) or "order changed") + ")"


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints of a run."""
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
