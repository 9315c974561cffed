"""VTAB-1k summaries: both conventions reproduce the published VPT-deep means."""

from __future__ import annotations

import pytest

from visionpeft.errors import DataError
from visionpeft.vit.summary import vtab_summary

# VPT-deep per task (VPT paper appendix, as reproduced in the V-PETL README), in VTAB order.
VPT_DEEP = dict(zip(
    ["cifar100", "caltech101", "dtd", "flowers102", "pets", "svhn", "sun397", "patch_camelyon", "eurosat",
     "resisc45", "diabetic_retinopathy", "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc",
     "dsprites_ori", "smallnorb_azi", "smallnorb_ele"],
    [78.8, 90.8, 65.8, 98.0, 88.3, 78.1, 49.6, 81.8, 96.1, 83.4, 68.4, 68.5, 60.0, 46.5, 72.8, 73.6, 47.9,
     32.9, 37.8],
    strict=True,
))


def test_vpt_deep_published_means():
    summary = vtab_summary(VPT_DEEP)
    assert summary["complete"] and not summary["missing"]
    assert summary["groups"]["natural"] == pytest.approx(78.49, abs=0.01)
    assert summary["groups"]["specialized"] == pytest.approx(82.43, abs=0.01)
    assert summary["groups"]["structured"] == pytest.approx(55.0, abs=0.01)
    assert summary["mean_of_group_means"] == pytest.approx(71.96, abs=0.02)
    assert summary["mean_over_tasks"] == pytest.approx(69.43, abs=0.01)


def test_aliases_partial_runs_and_duplicates():
    summary = vtab_summary({"cifar": 70.0, "oxford_iiit_pet": 90.0, "kitti": 50.0})
    assert set(summary["tasks"]) == {"cifar100", "pets", "kitti"}
    assert summary["groups"] == {"natural": 80.0, "structured": 50.0}
    assert not summary["complete"] and "dmlab" in summary["missing"]
    with pytest.raises(DataError, match="given twice"):
        vtab_summary({"cifar": 1.0, "cifar100": 2.0})
