"""Adapter files: ``adapter_config.json`` + ``adapter.safetensors``, written atomically.

Only trained tensors are saved, in safetensors (never pickle). The config records the method and
its config, the library versions and a fingerprint of the base model (the names and shapes of
its parameters) so that loading onto another base model fails before anything changes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from visionpeft import tensorfiles
from visionpeft._version import __version__
from visionpeft.errors import AdapterError, AdapterMismatchError
from visionpeft.hosts import model_family

logger = logging.getLogger("visionpeft")

ADAPTER_FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
EMBEDDED_CONFIG_KEY = "visionpeft_config"
#: the weights' metadata key of :func:`tensors_digest`
TENSORS_DIGEST_KEY = "visionpeft_tensors_sha256"


def _create_temporary(folder: Path, name: str) -> tuple[int, Path]:
    """Create, open and return a new empty file ``.<name>.<random>.tmp`` in ``folder``."""
    # Not tempfile.mkstemp: it creates mode 0o600 files, and the rename would keep that mode.
    # Creating with 0o666 lets the kernel apply the umask (and a folder's default ACL) as for any
    # file the user makes. Reading the umask to chmod instead would mean setting it (os.umask is
    # process-wide: another thread could create a file meanwhile) or parsing /proc (Linux only).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", os.fspath(folder / f".{name}.*.tmp"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is
    renamed over ``path`` (an atomic operation on POSIX and Windows). The file gets the mode the
    umask gives a new file (``0o666 & ~umask``). An ``OSError`` from writing (a full disk) names
    ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path.parent, path.name)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            if err.errno is None or err.filename is not None:
                raise
            # A failed write of an open file names no file; the caller's message needs the path.
            raise OSError(err.errno, err.strerror, os.fspath(path)) from err
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


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


def _split_safetensors(blob: bytes) -> tuple[dict[str, Any], memoryview]:
    """The header and the data section of a serialized safetensors file; ``ValueError`` if it is not one.

    The format: 8 bytes (little-endian header size), the JSON header, then the tensors' bytes.
    """
    if len(blob) < 8:
        raise ValueError("it is shorter than a safetensors header")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise ValueError("it is truncated inside its header")
    try:
        header = json.loads(bytes(blob[8 : 8 + size]))
    except ValueError as err:
        raise ValueError(f"its header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    data = memoryview(blob)[8 + size :]
    try:
        end = max((entry["data_offsets"][1] for k, entry in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError) as err:
        raise ValueError("its header does not describe tensors") from err
    if not isinstance(end, int) or end != len(data):
        raise ValueError(f"it is truncated or damaged: its header describes {end} bytes of tensor data, "
                         f"the file holds {len(data)}")
    return header, data


def tensors_digest(blob: bytes) -> str:
    """The SHA-256 of what a serialized adapter weights file says (``ValueError`` if it is not safetensors).

    It covers the tensor index (the header without ``__metadata__``, as canonical JSON), the data
    section and the config the file carries in its metadata (what crash recovery would load), but
    not the digest's own key, so it can be stored in the metadata of the file it checks.
    """
    return _digest(*_split_safetensors(blob))


def _digest(header: Mapping[str, Any], data: memoryview) -> str:
    index = {k: v for k, v in header.items() if k != "__metadata__"}
    digest = hashlib.sha256(json.dumps(index, sort_keys=True, separators=(",", ":")).encode())
    digest.update(data)
    digest.update(str((header.get("__metadata__") or {}).get(EMBEDDED_CONFIG_KEY, "")).encode())
    return digest.hexdigest()


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

    The weights file also carries the config and the SHA-256 of its own tensors
    (:func:`tensors_digest`) in its metadata, and the JSON config records the SHA-256 of the whole
    weights file. The weights are written first: if a crash comes between the two writes, the
    folder holds the new, self-describing and self-checking weights beside the old JSON, and
    :func:`read_adapter` loads the new adapter from the weights' own copy of the config.
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
    # Serialized twice: the digest goes into the header, and the tensors' index and bytes do not
    # depend on the metadata, so the second file has the tensors the first one's digest describes.
    metadata[TENSORS_DIGEST_KEY] = tensors_digest(safetensors_save(cpu, metadata=metadata))
    blob = safetensors_save(cpu, metadata=metadata)
    payload["weights"] = {"file": WEIGHTS_NAME, "sha256": hashlib.sha256(blob).hexdigest(), "num_tensors": len(cpu)}
    atomic_write_bytes(directory / WEIGHTS_NAME, blob)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")
    return directory


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` strings of a ``.safetensors`` file's header (empty if it has none).

    Only the header is read. A file that is missing or not safetensors raises
    :class:`~visionpeft.errors.AdapterError` naming it.
    """
    try:
        with safe_open(os.fspath(path), "pt") as f:
            return dict(f.metadata() or {})
    except (OSError, SafetensorError) as err:
        raise AdapterError(f"{path} is not a readable .safetensors file ({err}); it is truncated, damaged or not "
                           "safetensors: write it again or restore it") from err


_RESTORE = (f"Save the adapter again, or restore {WEIGHTS_NAME} and {CONFIG_NAME} together from a copy "
            "(the two files of one save)")


def _embedded_config(weights: Path, blob: bytes, sha256: str) -> dict[str, Any] | None:
    """The config the weights file (bytes ``blob``, checksum ``sha256``) carries in its metadata.

    ``None`` when it carries none (weights from elsewhere). Weights whose tensors do not match the
    digest in their own metadata, or that carry no digest (written by an older visionpeft, so
    they cannot be told from damaged ones), raise :class:`AdapterMismatchError`.
    """
    try:
        header, data = _split_safetensors(blob)
    except ValueError as err:
        raise AdapterMismatchError(
            f"{weights} is not a complete safetensors file ({err}) and does not match the checksum recorded in "
            f"{CONFIG_NAME}. {_RESTORE}"
        ) from err
    metadata = header.get("__metadata__")
    try:
        payload = json.loads(metadata[EMBEDDED_CONFIG_KEY])
    except (TypeError, KeyError, ValueError):
        return None
    if not isinstance(payload, dict):
        return None
    recorded = metadata.get(TENSORS_DIGEST_KEY)
    if recorded is None:
        raise AdapterMismatchError(
            f"{weights} does not match the checksum recorded in {CONFIG_NAME}, and it was written by an older "
            "visionpeft that stored no checksum of its tensors in the file, so it cannot be told apart from a damaged "
            f"file. {_RESTORE}"
        )
    if _digest(header, data) != recorded:
        raise AdapterMismatchError(
            f"{weights} is damaged: its tensors match neither the checksum stored in the file nor the one recorded "
            f"in {CONFIG_NAME}. {_RESTORE}"
        )
    payload["weights"] = {"file": weights.name, "sha256": sha256, "num_tensors": None}
    return payload


#: the fields of adapter_config.json that the weights' own copy must repeat
_DESCRIBED = ("format_version", "method", "adapter_name", "config", "base_model")


def _check_against_the_weights(path: Path, payload: Mapping[str, Any], weights: Path, blob: bytes) -> None:
    """Refuse an ``adapter_config.json`` whose content differs from the copy the (intact) weights carry.

    The JSON's checksum covers the weights only, so an edited or damaged JSON (an ``alpha`` changed
    by one bit) would otherwise load a different adapter. Weights without a copy are not checked.
    """
    try:
        header, _ = _split_safetensors(blob)
        copy = json.loads((header.get("__metadata__") or {})[EMBEDDED_CONFIG_KEY])
    except (ValueError, KeyError, TypeError):
        return
    if not isinstance(copy, dict):
        return
    differ = [k for k in _DESCRIBED if copy.get(k) != payload.get(k)]
    if differ:
        raise AdapterMismatchError(
            f"{path} was changed or is damaged: its {', '.join(differ)} differ from the copy stored in "
            f"{weights.name}. {_RESTORE}"
        )


def _read_weights(path: Path) -> tuple[bytes, str] | None:
    """The bytes of a weights file and their SHA-256, or ``None`` when it is missing: the one read of a load."""
    if not path.is_file():
        return None
    blob = path.read_bytes()
    return blob, hashlib.sha256(blob).hexdigest()


def _checked_config(path: Path, payload: dict[str, Any], weights: Path, read: tuple[bytes, str] | None
                    ) -> dict[str, Any]:
    """The config of an adapter folder, from the JSON at ``path`` or, if the JSON does not describe the
    weights (a save interrupted between its two writes), from the weights' metadata (with a warning)."""
    if read is not None and payload.get("weights", {}).get("sha256") != read[1]:
        embedded = _embedded_config(weights, *read)
        if embedded is not None:
            logger.warning(
                "%s does not describe %s (a save was interrupted between its two writes?); using the config "
                "stored in the weights file, whose tensors match their own checksum", path, weights.name,
            )
            payload = embedded
    version = payload.get("format_version")
    if version != ADAPTER_FORMAT_VERSION:
        raise AdapterMismatchError(
            f"{path} has format_version {version!r}; this visionpeft {__version__} reads version "
            f"{ADAPTER_FORMAT_VERSION}. Upgrade visionpeft to load it."
        )
    if read is not None and payload.get("weights", {}).get("sha256") == read[1]:
        _check_against_the_weights(path, payload, weights, read[0])
    for key in ("method", "adapter_name", "config", "base_model", "weights"):
        if key not in payload:
            raise AdapterMismatchError(f"{path} lacks the key {key!r}; the file is damaged or not from visionpeft")
    return payload


def _checked_tensors(path: Path, payload: Mapping[str, Any], weights: tuple[bytes, str] | None
                     ) -> dict[str, torch.Tensor]:
    """The tensors of the weights file read from ``path``, after checking it is the one ``payload`` describes."""
    if weights is None:
        raise AdapterMismatchError(f"{path} is missing; the adapter folder is incomplete")
    blob, sha256 = weights
    if sha256 != payload["weights"]["sha256"]:
        raise AdapterMismatchError(
            f"{path} does not match the checksum recorded in {CONFIG_NAME}: the save was interrupted "
            "or the file was changed. Save the adapter again or restore both files together."
        )
    return tensorfiles.read_safetensors(path, data=blob, error=AdapterMismatchError, fix=_RESTORE)


def _open_adapter(directory: Path) -> tuple[dict[str, Any], Path, tuple[bytes, str] | None]:
    """The checked config of an adapter folder, its weights file, and that file's bytes and checksum."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterMismatchError(
            f"{directory} is not a visionpeft adapter folder: {CONFIG_NAME} is missing (vp.save writes it)"
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # invalid JSON or not UTF-8
        raise AdapterMismatchError(f"{path} is not valid JSON ({err}); the file is damaged") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("weights", {}), dict):
        raise AdapterMismatchError(f"{path} is not an adapter config (a JSON object); the file is damaged")
    name = payload.get("weights", {}).get("file", WEIGHTS_NAME)
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        # A plain file name in the folder: never a path that reads another file.
        raise AdapterMismatchError(f"{path}: weights.file {name!r} is not a file name in {directory}; the file is "
                                   "damaged")
    weights = directory / name
    read = _read_weights(weights)
    return _checked_config(path, payload, weights, read), weights, read


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked config and the tensors of an adapter folder; errors say what is wrong with the folder.

    The weights file is read and hashed once, for both. When the JSON does not describe the
    weights beside it (a save interrupted between its two writes), the config the weights file
    carries is used instead, with a warning, once its tensors match the checksum it also carries;
    weights that match neither raise :class:`AdapterMismatchError` naming the file.
    """
    payload, weights, read = _open_adapter(Path(directory))
    return payload, _checked_tensors(weights, payload, read)


_STAGING_PREFIX = ".tmp-new-"
_PREVIOUS_PREFIX = ".tmp-old-"


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk (folders only where the OS can open them)."""
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_folder(Path(folder))


def _fsync_folder(path: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _recover(parent: Path, names: set[str] | None = None) -> None:
    """Clean up what interrupted :func:`replace_folder` calls left in ``parent`` (only ``names``, if given).

    A half-written new folder is deleted. A previous copy is put back when its folder is missing
    (the crash came between the two renames, so it is the last whole copy), else deleted.
    """
    for path in sorted(parent.glob(".tmp-*")):
        if names is not None and path.name not in names:
            continue
        if path.name.startswith(_PREVIOUS_PREFIX):
            target = parent / path.name[len(_PREVIOUS_PREFIX) :]
            if not target.exists():
                os.rename(path, target)
                continue
        shutil.rmtree(path, ignore_errors=True)


def replace_folder(target: str | os.PathLike, write: Callable[[Path], None], *, sweep: bool = False) -> Path:
    """Fill a new folder with ``write`` and put it at ``target`` whole; returns ``target``.

    Readers see the old folder or the new one, never a part: ``write`` fills an empty sibling,
    ``.tmp-new-<name>``, whose files are then flushed to disk, and a rename moves it into place.
    A rename within one file system is atomic, but no portable call swaps two non-empty folders,
    so an existing ``target`` is first renamed to ``.tmp-old-<name>`` and deleted only after the
    new folder is in place: at every moment one whole copy exists under one of the two names. The
    parent folder is flushed last, so the renames survive a power cut.

    If ``write`` or a rename fails, the new folder is deleted and ``target`` is left as it was.
    Leftovers of an earlier crash beside ``target`` are cleaned up first (a previous copy is put
    back if ``target`` is missing); with ``sweep``, every leftover in the parent folder is, for a
    folder that holds only folders written this way (checkpoints).
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f"{_STAGING_PREFIX}{target.name}"
    previous = parent / f"{_PREVIOUS_PREFIX}{target.name}"
    _recover(parent, None if sweep else {staging.name, previous.name})
    staging.mkdir()
    try:
        write(staging)
        _fsync_tree(staging)
        if target.exists():
            os.rename(target, previous)
        try:
            os.rename(staging, target)
        except BaseException:
            if previous.exists() and not target.exists():
                os.rename(previous, target)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    _fsync_folder(parent)
    return target


def read_text(path: str | os.PathLike, error: type[Exception] | None = None) -> str:
    """The UTF-8 text of the file at ``path``; a file that is not UTF-8 raises ``error`` naming it.

    ``error`` defaults to :class:`~visionpeft.errors.DataError`: list files, captions and split
    files are the data's. Binary or mis-encoded files would otherwise fail with a bare
    ``UnicodeDecodeError`` that names no file.
    """
    from visionpeft.errors import DataError

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise (error or DataError)(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8, or check that it is the "
            "file you meant"
        ) from err
