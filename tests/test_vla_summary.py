"""Summaries of vla runs: mean ± std over seeds, HM conventions checked on the MaPLe and CLIP tables."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from visionpeft.errors import DataError
from visionpeft.vla.summary import format_table, harmonic_mean, main, read_results, seed_stats, summarize

DATASETS = ["ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101", "FGVCAircraft",
            "SUN397", "DescribableTextures", "EuroSAT", "UCF101"]
# reference/vla.md section 3.1, per data set (Base, Novel); the averages are the READMEs' rows.
MAPLE = [(76.66, 70.54), (97.74, 94.36), (95.43, 97.76), (72.94, 74.00), (95.92, 72.46), (90.71, 92.05),
         (37.44, 35.61), (80.82, 78.70), (80.36, 59.18), (94.07, 73.23), (83.00, 78.66)]
CLIP = [(72.43, 68.14), (96.84, 94.00), (91.17, 97.26), (63.37, 74.89), (72.08, 77.80), (90.10, 91.22),
        (27.19, 36.29), (69.36, 75.35), (53.24, 59.90), (56.48, 64.05), (70.53, 77.50)]


def b2n_records(table, method, seed=1):
    return [{"method": method, "dataset": name, "seed": seed, "setting": "base2novel", "shots": 16, "base": b,
             "novel": n} for name, (b, n) in zip(DATASETS, table, strict=True)]


def test_harmonic_mean_on_published_cells():
    assert round(harmonic_mean(94.07, 73.23), 2) == 82.35  # MaPLe EuroSAT (multimodal-prompt-learning#28)
    assert round(harmonic_mean(82.69, 63.22), 2) == 71.66  # CoOp's 11-data-set average row
    assert harmonic_mean(0.0, 0.0) == 0.0
    with pytest.raises(DataError, match="finite"):
        harmonic_mean(float("nan"), 1.0)


@pytest.mark.parametrize(("table", "method", "expected"), [(MAPLE, "maple", (82.28, 75.14, 78.55)),
                                                            (CLIP, "zeroshot", (69.34, 74.22, 71.70))])
def test_average_hm_is_the_hm_of_the_averages(table, method, expected):
    group, = summarize(b2n_records(table, method))["groups"]
    average = group["average"]
    assert (round(average["base"], 2), round(average["novel"], 2), round(average["hm"], 2)) == expected
    assert average["datasets"] == 11 and group["missing_datasets"] == []
    mean_of_hms = sum(harmonic_mean(b, n) for b, n in table) / len(table)
    assert abs(mean_of_hms - expected[2]) > 0.1  # the other convention would not reproduce the tables
    assert round(group["datasets"]["EuroSAT"]["hm"], 2) == round(harmonic_mean(*table[9]), 2)


def test_seed_mean_std_and_hm_from_seed_means():
    records = [
        {"dataset": "eurosat", "seed": 1, "setting": "base2novel", "shots": 16, "base": 90.0},
        {"dataset": "EuroSAT", "seed": 1, "setting": "base2novel", "shots": 16, "novel": 60.0},
        {"dataset": "EuroSAT", "seed": 2, "setting": "base2novel", "shots": 16, "base": 92.0, "novel": 70.0},
        {"dataset": "EuroSAT", "seed": 3, "setting": "base2novel", "shots": 16, "base": 94.0, "novel": 80.0},
    ]
    entry = summarize(records)["groups"][0]["datasets"]["EuroSAT"]
    assert entry["seeds"] == [1, 2, 3] and entry["base"]["values"] == [90.0, 92.0, 94.0]
    assert entry["base"]["mean"] == pytest.approx(92.0) and entry["base"]["std"] == pytest.approx(math.sqrt(8 / 3))
    assert entry["novel"]["std"] == pytest.approx(math.sqrt(200 / 3))  # population std, as numpy.std
    assert entry["base"]["ci95"] == pytest.approx(1.96 * math.sqrt(8 / 3) / math.sqrt(3))
    assert entry["hm"] == pytest.approx(2 * 92 * 70 / 162)  # HM of the means, not the mean of per-seed HMs
    assert seed_stats([5.0]) == {"mean": 5.0, "std": 0.0, "ci95": 0.0, "n": 1, "values": [5.0]}


def test_fewshot_groups_by_method_and_shots():
    records = [{"method": "coop", "dataset": d, "seed": s, "setting": "fewshot", "shots": k, "accuracy": acc + s}
               for k, acc in ((1, 50.0), (16, 70.0)) for d in ("OxfordPets", "my_folder") for s in (1, 2, 3)]
    records.append({"method": "cocoop", "dataset": "OxfordPets", "seed": 1, "setting": "few-shot", "shots": 16,
                    "accuracy": 10.0})
    groups = summarize(records)["groups"]
    assert [(g["method"], g["shots"]) for g in groups] == [("coop", 1), ("coop", 16), ("cocoop", 16)]
    assert groups[1]["datasets"]["OxfordPets"]["accuracy"]["mean"] == pytest.approx(72.0)
    assert groups[1]["average"]["accuracy"] == pytest.approx(72.0)
    assert "my_folder" in groups[1]["datasets"] and "EuroSAT" in groups[1]["missing_datasets"]
    table = format_table(summarize(records))
    assert "### coop · fewshot · 16 shots" in table and "| OxfordPets | 72.00 ± 0.82 | 3     |" in table
    assert "| Average    | 72.00        |       |" in table


def test_bad_records():
    good = {"dataset": "EuroSAT", "seed": 1, "setting": "fewshot", "shots": 1, "accuracy": 50.0}
    with pytest.raises(DataError, match=r"lacks \['seed'\]"):
        summarize([{k: v for k, v in good.items() if k != "seed"}])
    with pytest.raises(DataError, match="setting 'zero' is not one of"):
        summarize([{**good, "setting": "zero"}])
    with pytest.raises(DataError, match="needs accuracy"):
        summarize([{**good, "accuracy": None}])
    with pytest.raises(DataError, match="needs base and novel"):
        summarize([{**good, "setting": "base2novel"}])
    with pytest.raises(DataError, match="not a finite number"):
        summarize([{**good, "accuracy": "high"}])
    with pytest.raises(DataError, match="given twice"):
        summarize([good, {**good, "accuracy": 51.0}])
    with pytest.raises(DataError, match="no result records"):
        summarize([])
    partial = summarize([{**good, "setting": "base2novel", "accuracy": None, "base": 80.0}])["groups"][0]
    assert partial["datasets"]["EuroSAT"]["hm"] is None and partial["average"]["hm"] is None
    assert partial["datasets"]["EuroSAT"]["missing"] == ["novel for seed(s) [1]"]


def test_command_line(tmp_path, capsys):
    paths = []
    for seed in (1, 2):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        records = b2n_records(MAPLE, "maple", seed) if seed == 1 else {"records": b2n_records(MAPLE, "maple", 2)}
        (run / "results.json").write_text(json.dumps(records))
        paths.append(str(run / "results.json"))
    assert len(read_results(paths)) == 22
    out = tmp_path / "summary.json"
    assert main([*paths, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "### maple · base2novel · 16 shots" in printed
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in printed.splitlines() if line.startswith("| ")]
    assert ["EuroSAT", "94.07 ± 0.00", "73.23 ± 0.00", "82.35", "2"] in rows
    assert ["Average", "82.28", "75.14", "78.55", ""] in rows
    assert json.loads(out.read_text())["groups"][0]["average"]["hm"] == pytest.approx(78.549, abs=1e-3)
    (tmp_path / "bad.json").write_text(json.dumps({"dataset": "EuroSAT"}))
    assert main([str(tmp_path / "bad.json")]) == 2
    assert "bad.json[0]" in capsys.readouterr().err
    done = subprocess.run([sys.executable, "-m", "visionpeft.vla.summary", paths[0], "--json"], capture_output=True,
                          text=True, check=True)
    assert json.loads(done.stdout)["groups"][0]["datasets"]["EuroSAT"]["base"]["mean"] == 94.07
