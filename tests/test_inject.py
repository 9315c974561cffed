"""Injection primitives: the one matching rule, dry runs, swaps and freezing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visionpeft import inject
from visionpeft.errors import NoMatchError

from toy import toy_net


def test_patterns_match_whole_names_only():
    model = toy_net()
    assert inject.find_modules(model, r"blocks\.\d+\.proj") == ["blocks.0.proj", "blocks.1.proj"]
    # A bare suffix never matches: 'proj' is not the whole name of any module.
    with pytest.raises(NoMatchError, match="'proj'"):
        inject.find_modules(model, "proj")
    assert inject.find_modules(model, ["embed.proj"]) == ["embed.proj"]


def test_a_list_is_the_union_in_model_order():
    model = toy_net()
    names = inject.find_modules(model, [r"blocks\.1\.fc1", "embed.proj", r"blocks\.0\.fc1"])
    assert names == ["embed.proj", "blocks.0.fc1", "blocks.1.fc1"]


def test_unmatched_pattern_names_the_closest_modules():
    with pytest.raises(NoMatchError, match=r"blocks\.0\.fc2.*closest: blocks\.0\.fc1"):
        inject.find_modules(toy_net(), [r"blocks\.0\.fc1", "blocks.0.fc2"])


def test_invalid_regex_is_reported():
    with pytest.raises(NoMatchError, match="not a valid regular expression"):
        inject.find_modules(toy_net(), "blocks.(")


def test_type_filter_and_dry_run_change_nothing():
    model = toy_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = inject.match_modules(model, r"blocks\.0\..*", types=(nn.Linear,))
    assert found == {r"blocks\.0\..*": ["blocks.0.fc1", "blocks.0.proj"]}
    report = inject.describe_matches(model, r"blocks\.0\..*")
    assert "blocks.0.act (GELU)" in report and "4 module(s)" in report
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_replace_and_restore():
    model = toy_net()
    original = model.blocks[0].fc1
    record = inject.replace_module(model, "blocks.0.fc1", nn.Identity())
    assert isinstance(model.blocks[0].fc1, nn.Identity)
    record.restore()
    assert model.blocks[0].fc1 is original


def test_restore_refuses_when_replaced_again():
    model = toy_net()
    record = inject.replace_module(model, "norm", nn.Identity())
    inject.replace_module(model, "norm", nn.Identity())
    with pytest.raises(RuntimeError, match="reverse order"):
        record.restore()


def test_freeze_count_and_snapshots():
    model = toy_net()
    total = sum(p.numel() for p in model.parameters())
    assert inject.count_parameters(model) == (total, total)
    state = inject.requires_grad_state(model)
    inject.freeze(model)
    assert inject.count_parameters(model) == (total, 0)
    inject.unfreeze(model.head)
    assert inject.count_parameters(model)[1] == sum(p.numel() for p in model.head.parameters())
    inject.restore_requires_grad(model, state)
    assert inject.count_parameters(model) == (total, total)


def test_shared_parameters_are_counted_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert inject.count_parameters(model)[0] == 16 + 4 + 4
