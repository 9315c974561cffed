"""Training curves: ``curves.png`` drawn from a run's ``metrics.jsonl``.

matplotlib is optional (``pip install 'visionpeft[plots]'``); without it the plot is skipped with
a log line and training is unaffected. The figure is drawn on matplotlib's Agg canvas directly, so
the global backend of an interactive session is left alone.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("visionpeft")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, skipping lines that are not JSON objects.

    A run killed while appending can leave a partial last line; it must not break plotting.
    """
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> Path | None:
    """Draw the training loss and every numeric evaluation metric against the step.

    Returns the written image, or ``None`` when matplotlib is missing or there is nothing to plot.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("curves.png skipped: matplotlib is not installed (pip install 'visionpeft[plots]')")
        return None
    records = read_metrics(metrics_path)
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    evals: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in (r.get("eval") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                evals.setdefault(key, []).append((r["step"], value))
    if not loss and not evals:
        return None
    panels = int(bool(loss)) + int(bool(evals))
    fig = Figure(figsize=(6 * panels, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    if loss:
        ax = axes[0]
        ax.plot(*zip(*loss, strict=True), label="train loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training loss")
    if evals:
        ax = axes[-1]
        for key, points in sorted(evals.items()):
            ax.plot(*zip(*points, strict=True), marker="o", label=key)
        ax.set_xlabel("step")
        ax.set_title("evaluation")
        ax.legend()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    return out_path
