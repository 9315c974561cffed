"""What ``visionpeft train`` prints at the end of a run: a short table for people, then one JSON line.

The JSON line (the trainer's result and the run folder) is always the last line of stdout, so a
script reads it with ``tail -n 1``; the table above it is for the person at the terminal.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: what comes first in the list of a run folder's files: what a user takes away
_FIRST = ("adapter", "results.json")


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def run_files(output_dir: str | os.PathLike) -> list[str]:
    """The top-level entries of a run folder (folders end in ``/``): the adapter and results first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    names = sorted(folder.iterdir(), key=lambda p: (p.name not in _FIRST, _FIRST.index(p.name) if p.name in _FIRST
                                                     else 0, p.name))
    return [p.name + ("/" if p.is_dir() else "") for p in names if not p.name.startswith(".")]


def run_table(output_dir: str | os.PathLike, result: dict[str, Any]) -> str:
    """A few aligned lines: the final metrics, steps and epochs, time, trainable parameters and the files."""
    rows: list[tuple[str, str]] = []
    for key, value in (result.get("eval") or {}).items():
        rows.append((key, _number(value)))
    steps = f"{result['step']:,}"
    if "epochs" in result:
        steps += f" ({_number(result['epochs'])} epochs)"
    rows.append(("steps", steps))
    if result.get("loss") is not None:
        rows.append(("train loss", f"{_number(result['loss'])} (the last logged mean)"))
    if "seconds" in result:
        rows.append(("time", f"{_number(result['seconds'])} s"))
    params = result.get("params")
    if params:
        share = 100.0 * params["trainable"] / max(params["total"], 1)
        rows.append(("trainable", f"{params['trainable']:,} of {params['total']:,} parameters ({share:.2g} %)"))
    rows.append(("run folder", str(output_dir)))
    files = run_files(output_dir)
    if files:
        rows.append(("files", "  ".join(files)))
    if result.get("stopped"):
        rows.append(("stopped", "before the end of the schedule; continue with --resume"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run_json(output_dir: str | os.PathLike, result: dict[str, Any]) -> str:
    """The machine-readable line: ``{"output_dir": ..., **result}``."""
    return json.dumps({"output_dir": str(output_dir), **result}, default=str)
