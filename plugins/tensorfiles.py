"""Reading tensor files that may be damaged, with errors that name the file and say what to do.

safetensors and torch report a damaged file with their own exception types (``SafetensorError``,
``UnpicklingError``, a ``RuntimeError`` from the zip reader, ``EOFError``, ...) whose messages name
no file. The readers here turn each into the caller's :class:`~visionpeft.errors.VisionPeftError`
subclass, naming the path. Torch files are loaded with ``weights_only=True`` only: a pickle that
needs more than tensors and plain containers is refused, never executed.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

from visionpeft.errors import VisionPeftError

# Markers of torch's reader errors, which are plain RuntimeErrors.
_TORCH_READ_MARKERS = ("PytorchStreamReader", "zip archive", "unexpected EOF", "corrupted", "magic number")


def _first_line(err: BaseException) -> str:
    """The first sentence of an exception's message, for a one-line error."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line.split(". ")[0].rstrip(".")[:200]


def _refused_pickle(err: BaseException) -> bool:
    """Whether ``err`` is ``weights_only`` refusing a valid pickle (not a damaged one: an unknown opcode)."""
    text = str(err)
    return (isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text
            and "Unsupported operand" not in text)


def reader_problem(err: BaseException) -> str | None:
    """What a safetensors or torch reader's exception says about the file, as words that follow its path.

    ``None`` when ``err`` is not recognisably a reader's complaint about the file (a caller that
    loads through another library uses this to tell a damaged file from other failures).
    """
    if isinstance(err, SafetensorError):
        return f"is not a complete .safetensors file: it is truncated or damaged ({_first_line(err)})"
    if _refused_pickle(err):
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        holds = f" (it holds {found.group(1)})" if found else ""
        return (f"is a pickled checkpoint with Python objects besides tensors{holds}, which torch.load(weights_only="
                "True) refuses because unpickling them could run code")
    if isinstance(err, RuntimeError) and "TorchScript" in str(err):
        return "is a TorchScript archive (torch.jit.save), not a file of weights"
    if isinstance(err, EOFError):
        return "is empty or truncated"
    if isinstance(err, OSError) and err.errno == errno.EINVAL and err.filename is None:
        return f"is truncated or damaged ({err.strerror} while reading it)"  # torch's zip reader on a cut-off file
    if isinstance(err, pickle.UnpicklingError):
        return f"is damaged or not a torch file ({_first_line(err)})"
    if isinstance(err, RuntimeError) and any(m in str(err) for m in _TORCH_READ_MARKERS):
        return f"is truncated or damaged ({_first_line(err)})"
    return None


def conversion_hint(path: str | os.PathLike, err: BaseException) -> str | None:
    """How to turn a pickled or TorchScript file into one that loads, or ``None`` for other problems.

    Only for a file whose source the user trusts: the conversion unpickles it.
    """
    path = Path(path)
    out = path.with_suffix(".safetensors")
    if isinstance(err, RuntimeError) and "TorchScript" in str(err):
        read = f"torch.jit.load('{path}', map_location='cpu').state_dict()"
    elif _refused_pickle(err):
        read = f"torch.load('{path}', map_location='cpu', weights_only=False); sd = sd.get('state_dict', sd)"
    else:
        return None
    return ("only .safetensors files and weights-only torch files are loaded. If you trust the file's source, convert "
            f"it once: python -c \"import torch; from safetensors.torch import save_file; sd = {read}; "
            f"save_file({{k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, '{out}')\" and give "
            f"{out} instead")


def _error(path: Path, err: Exception, kind: str, error: type[VisionPeftError], fix: str, key: str,
           convert: bool = False) -> VisionPeftError:
    problem = reader_problem(err) or f"is damaged or not a {kind} file ({type(err).__name__}: {_first_line(err)})"
    prefix = f"{key}: " if key else ""
    return error(f"{prefix}{path} {problem}; {(conversion_hint(path, err) if convert else None) or fix}")


def read_safetensors(path: str | os.PathLike, *, error: type[VisionPeftError], fix: str, key: str = "",
                     data: bytes | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (or of its bytes ``data``, already read).

    A damaged file raises ``error`` naming ``path`` (after ``key``, a run-config key path, if
    given), what is wrong and ``fix``. A file that cannot be opened raises the ``OSError``.
    """
    path = Path(path)
    try:
        return safetensors_load(path.read_bytes() if data is None else data)
    except SafetensorError as err:
        raise _error(path, err, "safetensors", error, fix, key) from err


def read_torch(path: str | os.PathLike, *, error: type[VisionPeftError], fix: str, key: str = "",
               weights: bool = False) -> Any:
    """What a torch file holds, loaded on the CPU with ``torch.load(weights_only=True)``.

    A damaged file, a pickle ``weights_only`` refuses and a TorchScript archive raise ``error``
    naming ``path`` (after ``key``, if given), what is wrong and ``fix``; for a file of model
    ``weights``, a pickle or an archive gets :func:`conversion_hint` instead of ``fix``. A file
    that cannot be opened raises the ``OSError``.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        if err.filename is not None:  # opening failed; an error while reading the content names no file
            raise
        raise _error(path, err, "torch", error, fix, key, weights) from err
    except Exception as err:  # torch reports a damaged file with many types (EOFError, KeyError, RuntimeError, ...)
        raise _error(path, err, "torch", error, fix, key, weights) from err
