"""Adapter files: ``adapter_config.json`` + ``adapter.safetensors``, written atomically.

Only trained tensors are saved, in safetensors (never pickle). The config records the method and
its config, the library versions and a fingerprint of the base model (the names and shapes of
its parameters) so that loading onto another base model fails before anything changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from visionpeft._version import __version__
from visionpeft.errors import AdapterMismatchError
from visionpeft.hosts import model_family

logger = logging.getLogger("visionpeft")

ADAPTER_FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
EMBEDDED_CONFIG_KEY = "visionpeft_config"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is
    renamed over ``path`` (an atomic operation on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """The identity of a base model: its family, parameter names and shapes, and their hash."""
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    digest = hashlib.sha256(json.dumps(list(shapes.items())).encode()).hexdigest()
    return {
        "family": model_family(model),
        "fingerprint": f"sha256:{digest}",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "parameters": shapes,
    }


def explain_mismatch(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> str | None:
    """How two fingerprints differ, in words, or ``None`` when they are the same model."""
    if expected.get("fingerprint") == actual.get("fingerprint"):
        return None
    want, have = expected.get("parameters", {}), actual.get("parameters", {})
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    shape = [f"{n} {want[n]} vs {have[n]}" for n in want if n in have and list(want[n]) != list(have[n])]
    parts = []
    if expected.get("family") != actual.get("family"):
        parts.append(f"family {expected.get('family')!r} vs {actual.get('family')!r}")
    for label, items in (("missing in this model", missing), ("not in the adapter's base", extra),
                         ("shape (adapter's base vs this model)", shape)):
        if items:
            parts.append(f"{label}: {', '.join(items[:4])}{f' and {len(items) - 4} more' if len(items) > 4 else ''}")
    if not parts:
        parts.append("parameter order differs")
    return "; ".join(parts)


def _library_versions() -> dict[str, str]:
    versions = {"visionpeft": __version__, "torch": torch.__version__, "python": platform.python_version()}
    # Only libraries already imported: recording versions must not import a domain library.
    for lib in ("timm", "open_clip", "diffusers", "transformers", "peft"):
        module = sys.modules.get(lib)
        if module is not None and hasattr(module, "__version__"):
            versions[lib] = module.__version__
    return versions


def write_adapter(
    directory: str | os.PathLike,
    *,
    method: str,
    adapter_name: str,
    config: Mapping[str, Any],
    base: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
) -> Path:
    """Write an adapter folder; each file is replaced atomically.

    The weights file also carries the config in its metadata, and the JSON config records the
    weights' SHA-256. The weights are written first: if a crash comes between the two writes, the
    folder holds the new, self-describing weights beside the old JSON, and
    :func:`read_adapter_config` loads the new adapter from the weights' own copy of the config.
    """
    directory = Path(directory)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    payload: dict[str, Any] = {
        "format_version": ADAPTER_FORMAT_VERSION,
        "method": method,
        "adapter_name": adapter_name,
        "config": dict(config),
        "base_model": dict(base),
        "versions": _library_versions(),
    }
    metadata = {"format": "pt", "visionpeft_method": method, EMBEDDED_CONFIG_KEY: json.dumps(payload)}
    blob = safetensors_save(cpu, metadata=metadata)
    payload["weights"] = {"file": WEIGHTS_NAME, "sha256": hashlib.sha256(blob).hexdigest(), "num_tensors": len(cpu)}
    atomic_write_bytes(directory / WEIGHTS_NAME, blob)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")
    return directory


def _embedded_config(weights: Path) -> dict[str, Any] | None:
    """The config a weights file carries in its metadata, with its checksum, or ``None``."""
    try:
        blob = weights.read_bytes()
        header_len = int.from_bytes(blob[:8], "little")
        metadata = json.loads(blob[8 : 8 + header_len]).get("__metadata__", {})
        payload = json.loads(metadata[EMBEDDED_CONFIG_KEY])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    payload["weights"] = {"file": weights.name, "sha256": hashlib.sha256(blob).hexdigest(), "num_tensors": None}
    return payload


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``adapter_config.json``; errors say what is wrong with the folder.

    When the JSON does not describe the weights file beside it (a save interrupted between its
    two writes), the config the weights file carries is used instead, with a warning.
    """
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterMismatchError(
            f"{directory} is not a visionpeft adapter folder: {CONFIG_NAME} is missing (vp.save writes it)"
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AdapterMismatchError(f"{path} is not valid JSON ({err}); the file is damaged") from err
    recorded = payload.get("weights", {})
    weights = directory / recorded.get("file", WEIGHTS_NAME)
    if weights.is_file() and recorded.get("sha256") != hashlib.sha256(weights.read_bytes()).hexdigest():
        embedded = _embedded_config(weights)
        if embedded is not None:
            logger.warning(
                "%s does not describe %s (a save was interrupted between its two writes?); using the config "
                "stored in the weights file", path, weights.name,
            )
            payload = embedded
    version = payload.get("format_version")
    if version != ADAPTER_FORMAT_VERSION:
        raise AdapterMismatchError(
            f"{path} has format_version {version!r}; this visionpeft {__version__} reads version "
            f"{ADAPTER_FORMAT_VERSION}. Upgrade visionpeft to load it."
        )
    for key in ("method", "adapter_name", "config", "base_model", "weights"):
        if key not in payload:
            raise AdapterMismatchError(f"{path} lacks the key {key!r}; the file is damaged or not from visionpeft")
    return payload


def read_adapter_tensors(directory: str | os.PathLike, payload: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Read ``adapter.safetensors`` after checking it is the file the config was written with."""
    path = Path(directory) / payload["weights"]["file"]
    if not path.is_file():
        raise AdapterMismatchError(f"{path} is missing; the adapter folder is incomplete")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != payload["weights"]["sha256"]:
        raise AdapterMismatchError(
            f"{path} does not match the checksum recorded in {CONFIG_NAME}: the save was interrupted "
            "or the file was changed. Save the adapter again or restore both files together."
        )
    return safetensors_load(blob)
