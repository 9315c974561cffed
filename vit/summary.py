"""Summaries over VTAB-1k tasks, with both averaging conventions named.

VPT, NOAH and PETL-ViT report the *mean of the three group means* (natural, specialized,
structured); V-PETL Bench reports the *mean over the 19 tasks*. They differ (VPT-deep: 71.96 vs
69.43), so a summary gives both, labelled, with the per-group means.

    python -m visionpeft.vit.summary runs/*/results.json      # each run folder named after its task
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from visionpeft.errors import DataError
from visionpeft.vit.data import VTAB_GROUPS, canonical_vtab_task


def vtab_summary(accuracy: Mapping[str, float]) -> dict[str, Any]:
    """Per-group means, the mean of group means and the mean over tasks of per-task accuracies.

    ``accuracy`` maps task names (any known spelling) to top-1. Groups with no task are left out
    of the mean of group means, and ``complete`` says whether all 19 tasks were given.
    """
    tasks: dict[str, float] = {}
    for name, value in accuracy.items():
        task = canonical_vtab_task(name)
        if task in tasks:
            raise DataError(f"VTAB-1k task {task!r} is given twice ({name!r})")
        tasks[task] = float(value)
    groups = {
        group: statistics.fmean(tasks[t] for t in members if t in tasks)
        for group, members in VTAB_GROUPS.items()
        if any(t in tasks for t in members)
    }
    expected = {t for members in VTAB_GROUPS.values() for t in members}
    return {
        "tasks": tasks,
        "groups": groups,
        "mean_of_group_means": statistics.fmean(groups.values()) if groups else None,
        "mean_over_tasks": statistics.fmean(tasks.values()) if tasks else None,
        "complete": set(tasks) == expected,
        "missing": sorted(expected - set(tasks)),
        "conventions": {
            "mean_of_group_means": "VPT / NOAH / PETL-ViT: the mean of the natural, specialized and structured means",
            "mean_over_tasks": "V-PETL Bench: the mean over the tasks",
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Summarise ``results.json`` files of VTAB-1k runs; the task is each run folder's name."""
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m visionpeft.vit.summary RUN/results.json ... (folders named after tasks)")
        return 2
    accuracy = {}
    for path in paths:
        results = json.loads(path.read_text())
        accuracy[path.parent.name] = results["top1_last"]
    print(json.dumps(vtab_summary(accuracy), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
