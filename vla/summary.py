"""Summaries of CLIP prompt-learning runs over seeds and data sets, as the CoOp, CoCoOp and MaPLe tables report them.

A result record is a mapping with ``dataset``, ``seed``, ``setting`` (``fewshot`` or ``base2novel``),
``shots`` and either ``accuracy`` (few-shot) or ``base`` and ``novel`` (base-to-novel), in percent, and
optionally ``method``. Records are grouped by (method, setting, shots); per data set the summary gives the
mean and standard deviation over seeds (NumPy's population std, as CoOp's ``parse_test_res.py``) and the
95% interval ``1.96 * std / sqrt(n)``, then the average over data sets.

Harmonic mean convention: per data set, HM of the seed-mean base and seed-mean novel accuracies; on
average, HM of the data-set-average base and novel accuracies (not the mean of per-data-set HMs). This is
how the CoCoOp and MaPLe tables are computed: MaPLe's per-data-set numbers average to 82.28 / 75.14 and
HM(82.28, 75.14) = 78.55 is its reported average, where the mean of the HMs would be 78.27.

    python -m visionpeft.vla.summary runs/*/results.json          # a table
    python -m visionpeft.vla.summary runs/*/results.json --json   # the summary as JSON

Each ``results.json`` holds one record, a list of them, or ``{"records": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from visionpeft.errors import DataError
from visionpeft.vla.data import DATASETS, canonical_dataset

SETTINGS = ("fewshot", "base2novel")
_SETTING_ALIASES = {"fewshot": "fewshot", "few_shot": "fewshot", "few-shot": "fewshot", "base2novel": "base2novel",
                    "base2new": "base2novel", "base_to_novel": "base2novel", "base-to-novel": "base2novel",
                    "b2n": "base2novel"}
CONVENTIONS = {
    "std": "population standard deviation over seeds (numpy.std, ddof=0), as CoOp's parse_test_res.py",
    "ci95": "1.96 * std / sqrt(number of seeds), as parse_test_res.py --ci95",
    "hm": "per data set: HM of the seed-mean base and novel accuracies; average: HM of the average base and "
          "average novel accuracies over data sets (the CoCoOp / MaPLe tables' convention)",
    "average": "unweighted mean over data sets of the per-data-set seed means",
}


def harmonic_mean(base: float, novel: float) -> float:
    """The harmonic mean ``2 * base * novel / (base + novel)`` of two accuracies (0 when both are 0)."""
    for name, value in (("base", base), ("novel", novel)):
        if not math.isfinite(value) or value < 0:
            raise DataError(f"{name} accuracy {value!r} must be a finite number >= 0")
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def seed_stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, population std, 95% interval and the values of one metric over seeds."""
    mean = statistics.fmean(values)
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": 1.96 * std / math.sqrt(len(values)), "n": len(values),
            "values": list(values)}


def _dataset_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise DataError(f"dataset {name!r} must be a non-empty string")
    try:
        return canonical_dataset(name)
    except DataError:
        return name  # data outside the protocol (an image folder) keeps its own name


def _number(record: Mapping[str, Any], key: str, where: str) -> float:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: {key} = {value!r} is not a finite number")
    return float(value)


def _seed_order(seed: Any) -> tuple:
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def _normalise(record: Any, where: str) -> tuple[tuple[Any, str, Any], str, Any, dict[str, float]]:
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: a result record must be a mapping, got {type(record).__name__}")
    missing = [k for k in ("dataset", "seed", "setting") if k not in record]
    if missing:
        raise DataError(f"{where}: result record lacks {missing}; a record has dataset, seed, setting "
                        "('fewshot' or 'base2novel'), shots and accuracy (or base and novel)")
    setting = _SETTING_ALIASES.get(str(record["setting"]).lower())
    if setting is None:
        raise DataError(f"{where}: setting {record['setting']!r} is not one of {list(SETTINGS)}")
    metrics = ("accuracy",) if setting == "fewshot" else ("base", "novel")
    values = {m: _number(record, m, where) for m in metrics if record.get(m) is not None}
    if not values:
        raise DataError(f"{where}: a {setting} record needs {' and '.join(metrics)}")
    group = (record.get("method"), setting, record.get("shots"))
    return group, _dataset_name(record["dataset"]), record["seed"], values


def summarize(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per (method, setting, shots) group: per-data-set statistics over seeds and the average over data sets.

    Base and novel accuracies of one seed may come in one record or two. A metric given twice for the same
    data set and seed with different values raises :class:`DataError`. ``missing_datasets`` lists the
    protocol's eleven data sets that a group lacks.
    """
    table: dict[tuple, dict[str, dict[Any, dict[str, float]]]] = {}
    for index, record in enumerate(results):
        group, dataset, seed, values = _normalise(record, f"record {index}")
        seeds = table.setdefault(group, {}).setdefault(dataset, {})
        have = seeds.setdefault(seed, {})
        for metric, value in values.items():
            if metric in have and have[metric] != value:
                raise DataError(f"record {index}: {metric} of {dataset} seed {seed} is given twice "
                                f"({have[metric]} and {value}); {group}")
            have[metric] = value
    if not table:
        raise DataError("no result records to summarise; pass the results.json files of finished runs, e.g. "
                        "python -m visionpeft.vla.summary runs/*/results.json")
    groups = []
    for (method, setting, shots), datasets in table.items():
        per_dataset: dict[str, Any] = {}
        for dataset, seeds in datasets.items():
            entry: dict[str, Any] = {"seeds": sorted(seeds, key=_seed_order)}
            metrics = ("accuracy",) if setting == "fewshot" else ("base", "novel")
            for metric in metrics:
                values = [seeds[s][metric] for s in entry["seeds"] if metric in seeds[s]]
                entry[metric] = seed_stats(values) if values else None
                lacking = [s for s in entry["seeds"] if metric not in seeds[s]]
                if lacking:
                    entry.setdefault("missing", []).append(f"{metric} for seed(s) {lacking}")
            if setting == "base2novel":
                both = entry["base"] is not None and entry["novel"] is not None
                entry["hm"] = harmonic_mean(entry["base"]["mean"], entry["novel"]["mean"]) if both else None
            per_dataset[dataset] = entry
        average: dict[str, Any] = {"datasets": len(per_dataset)}
        if setting == "fewshot":
            average["accuracy"] = statistics.fmean(e["accuracy"]["mean"] for e in per_dataset.values())
        else:
            for metric in ("base", "novel"):
                means = [e[metric]["mean"] for e in per_dataset.values() if e[metric] is not None]
                average[metric] = statistics.fmean(means) if means else None
            complete = all(e["hm"] is not None for e in per_dataset.values())
            average["hm"] = harmonic_mean(average["base"], average["novel"]) if complete else None
        groups.append({
            "method": method, "setting": setting, "shots": shots, "datasets": per_dataset, "average": average,
            "missing_datasets": [name for name in DATASETS if name not in per_dataset],
        })
    return {"groups": groups, "conventions": dict(CONVENTIONS)}


def _cell(stats: Mapping[str, Any] | None) -> str:
    if stats is None:
        return "-"
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}" if stats["n"] > 1 else f"{stats['mean']:.2f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown tables, one per group: mean ± std over seeds per data set, then the average."""
    blocks = []
    for group in summary["groups"]:
        title = " · ".join(str(p) for p in (group["method"], group["setting"]) if p is not None)
        if group["shots"] is not None:
            title += f" · {group['shots']} shots"
        if group["setting"] == "fewshot":
            rows = [["Dataset", "Accuracy", "Seeds"]]
            rows += [[name, _cell(e["accuracy"]), str(len(e["seeds"]))] for name, e in group["datasets"].items()]
            rows.append(["Average", _num(group["average"]["accuracy"]), ""])
        else:
            rows = [["Dataset", "Base", "Novel", "HM", "Seeds"]]
            rows += [[name, _cell(e["base"]), _cell(e["novel"]), _num(e["hm"]), str(len(e["seeds"]))]
                     for name, e in group["datasets"].items()]
            avg = group["average"]
            rows.append(["Average", _num(avg["base"]), _num(avg["novel"]), _num(avg["hm"]), ""])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        blocks.append(f"### {title}\n\n" + "\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def read_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The result records of ``results.json`` files: each holds a record, a list of them or ``{"records": [...]}``."""
    records = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"results file {path} does not exist")
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"results file {path} is not valid JSON: {exc}") from exc
        if isinstance(content, Mapping) and "records" in content:
            content = content["records"]
        for index, record in enumerate(content if isinstance(content, list) else [content]):
            try:
                _normalise(record, f"{path}")
            except DataError as exc:
                raise DataError(f"{path}[{index}]: {exc}") from None
            records.append(dict(record))
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """Summarise ``results.json`` files of vla runs: a table per method, setting and shots, or JSON."""
    parser = argparse.ArgumentParser(prog="python -m visionpeft.vla.summary", description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="results.json files (one record, a list, or {'records': [...]})")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    parser.add_argument("--out", help="also write the summary as JSON to this file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = summarize(read_results(args.results))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        from visionpeft.files import atomic_write_text

        atomic_write_text(args.out, json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2) if args.json else format_table(summary).rstrip("\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
