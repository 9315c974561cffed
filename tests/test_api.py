"""The public API: the exact names, errors before changes, several adapters, summary."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.errors import AdapterError, UnsupportedModelError
from visionpeft.method import get_state

from toy import toy_inputs, toy_net


def test_public_names_are_exactly_the_documented_ones():
    assert sorted(vp.__all__) == ["attach", "config", "detach", "load", "merge", "methods", "save", "summary"]


def test_unsupported_model_names_the_supported_families():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match=r"cannot adapt a torch\.nn.*Sequential.*tests\.ToyNet"):
        vp.attach(model, "lora")
    assert get_state(model) is None


def test_bad_targets_fail_before_any_change():
    model = toy_net()
    reference = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="matched no module"):
        vp.attach(model, "lora", targets=["blocks.0.nothing"])
    with pytest.raises(ValueError, match=r"LoRA cannot adapt: blocks\.0\.act"):
        vp.attach(model, "lora", targets=[r"blocks\.0\.act"])
    with pytest.raises(ValueError, match="matched the head"):
        vp.attach(model, "lora", targets=["head"])
    assert get_state(model) is None
    assert list(model.state_dict()) == list(reference)
    assert all(p.requires_grad for p in model.parameters())


def test_adapter_names_must_be_identifiers():
    with pytest.raises(AdapterError, match="identifier"):
        vp.attach(toy_net(), "lora", name="my adapter")


def test_two_adapters_stack_and_detach_in_reverse_order(tmp_path):
    model = toy_net()
    x = toy_inputs()
    base_out = model(x)
    model = vp.attach(model, "lora", name="a")
    model = vp.attach(model, "bitfit", name="b", train_head=False)
    assert list(get_state(model).adapters) == ["a", "b"]
    with pytest.raises(AdapterError, match="reverse order"):
        vp.detach(model, "a")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    # Both adapters stay trainable: the second attach did not freeze the first one's tensors.
    summary = vp.summary(model)
    assert summary["trainable"] == sum(a["trainable"] for a in summary["adapters"].values())
    with pytest.raises(AdapterError, match="pass name="):
        vp.save(model, tmp_path)
    vp.save(model, tmp_path / "a", name="a")
    model = vp.detach(model, "b")
    assert list(get_state(model).adapters) == ["a"]
    model = vp.detach(model)
    assert torch.equal(model(x), base_out)


def test_operations_on_a_plain_model_say_nothing_is_attached(tmp_path):
    for op in (vp.detach, vp.merge):
        with pytest.raises(AdapterError, match="no visionpeft adapter is attached"):
            op(toy_net())
    with pytest.raises(AdapterError, match="no visionpeft adapter is attached"):
        vp.save(toy_net(), tmp_path)


def test_summary_counts_and_table():
    model = vp.attach(toy_net(), "lora", r=2)
    s = vp.summary(model)
    total = sum(p.numel() for p in model.parameters())
    assert s["total"] == total
    # r * (in + out) per adapted Linear: fc1 16->32, proj 32->16 in two blocks, plus the head copy.
    lora = 2 * (2 * (16 + 32) + 2 * (32 + 16))
    head = 16 * 3 + 3
    assert s["trainable"] == lora + head == s["adapters"]["default"]["trainable"]
    text = str(s)
    assert "default" in text and "lora" in text and f"{lora + head:,}" in text


def test_merged_model_is_plain_and_keeps_the_trained_head():
    model = vp.attach(toy_net(), "lora")
    with torch.no_grad():
        model.head.copies["default"].bias.fill_(3.0)
    merged = vp.merge(model)
    assert isinstance(merged.head, nn.Linear) and torch.all(merged.head.bias == 3.0)
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in toy_net().named_parameters()]
