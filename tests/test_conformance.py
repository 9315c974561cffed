"""The conformance suite: every registered method passes it, with no per-method test code.

Parametrized over ``vp.methods()``: registering a method is enough to get it tested. Each domain
names the tiny model its methods are tested on in ``CASES``; a registered method whose domain has
no case fails here instead of going untested.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.errors import AdapterError, AdapterMismatchError
from visionpeft.method import get_state
from visionpeft.registry import get_method

from toy import toy_inputs, toy_net


@dataclass
class Case:
    """A tiny model of one family, its inputs, and extra attach arguments per method."""

    build: Callable[[int], nn.Module]
    inputs: Callable[[], Any]
    kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def forward(self, model: nn.Module) -> torch.Tensor:
        return model(self.inputs())


# Cases per method domain; core methods run on every case listed under "core".
CASES: dict[str, list[Case]] = {
    "core": [Case(build=lambda seed: toy_net(seed, dropout=0.0), inputs=toy_inputs)],
}

# Config arguments a method needs beyond its defaults (none so far).
CONFIG_KWARGS: dict[str, dict[str, Any]] = {}

METHODS = [m.name for m in vp.methods()]
PARAMS = [
    pytest.param(m.name, i, id=f"{m.name}-{i}")
    for m in vp.methods()
    for i in range(max(1, len(CASES.get(m.domain, []))))
]


def _case(method: str, index: int) -> Case:
    domain = get_method(method).domain
    cases = CASES.get(domain, [])
    if not cases:
        pytest.fail(f"method {method!r} (domain {domain!r}) has no conformance case: add one to CASES")
    return cases[index]


def _attach(case: Case, method: str, model: nn.Module, **extra: Any) -> nn.Module:
    return vp.attach(model, method, **case.kwargs.get(method, {}), **extra)


def _perturb(model: nn.Module, seed: int = 7) -> None:
    """Move every trainable tensor away from its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_every_method_has_a_case():
    assert METHODS, "no method is registered: the entry points of the package are missing"
    for name in METHODS:
        assert CASES.get(get_method(name).domain), f"{name} has no conformance case"


@pytest.mark.parametrize(("method", "index"), PARAMS)
def test_gradients_reach_only_trained_tensors(method, index):
    case = _case(method, index)
    model = _attach(case, method, case.build(0))
    model.train()
    case.forward(model).square().mean().backward()
    trained = {id(t) for t in get_state(model).adapters["default"].method.trained_tensors(model).values()}
    assert trained, "the method trains nothing"
    nonzero = 0
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.requires_grad, f"{name} is trained but frozen"
            assert p.grad is not None, f"{name} is trained but got no gradient"
            nonzero += int(p.grad.abs().sum() > 0)
        else:
            assert not p.requires_grad, f"{name} is not the method's but requires grad"
            assert p.grad is None, f"{name} is frozen but got a gradient"
    assert nonzero > 0, "every gradient of the trained tensors is zero"
    assert vp.summary(model)["trainable"] == sum(
        t.numel() for t in get_state(model).adapters["default"].method.trained_tensors(model).values()
    )


@pytest.mark.parametrize(("method", "index"), PARAMS)
def test_identity_at_attach(method, index):
    case = _case(method, index)
    if not get_method(method).starts_as_identity:
        pytest.skip(f"{method} changes the output at init by design (starts_as_identity is False)")
    model = case.build(0).eval()
    before = case.forward(model)
    after = case.forward(_attach(case, method, model).eval())
    assert torch.equal(before, after)


@pytest.mark.parametrize(("method", "index"), PARAMS)
def test_save_load_reproduces_outputs(method, index, tmp_path):
    case = _case(method, index)
    model = _attach(case, method, case.build(0)).eval()
    _perturb(model)
    expected = case.forward(model)
    vp.save(model, tmp_path)
    loaded = vp.load(case.build(0), tmp_path).eval()
    assert torch.equal(case.forward(loaded), expected)
    assert vp.summary(loaded)["trainable"] == vp.summary(model)["trainable"]


@pytest.mark.parametrize(("method", "index"), PARAMS)
def test_detach_restores_the_original(method, index):
    case = _case(method, index)
    model = case.build(0)
    next(model.parameters()).requires_grad_(False)  # mixed flags, which detach must restore
    reference = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    attributes = set(model.__dict__)
    adapted = _attach(case, method, model)
    adapted.train()
    _perturb(adapted)
    restored = vp.detach(adapted)
    state = restored.state_dict()
    assert list(state) == list(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    assert {n: p.requires_grad for n, p in restored.named_parameters()} == flags
    assert {n: m.training for n, m in restored.named_modules()} == modes
    assert get_state(restored) is None
    assert set(restored.__dict__) == attributes


@pytest.mark.parametrize(("method", "index"), PARAMS)
def test_merge(method, index):
    case = _case(method, index)
    model = _attach(case, method, case.build(0)).eval()
    _perturb(model)
    if not get_method(method).mergeable:
        with pytest.raises(AdapterError, match="cannot merge"):
            vp.merge(model)
        assert get_state(model) is not None
        return
    expected = case.forward(model)
    merged = vp.merge(model)
    assert get_state(merged) is None
    assert torch.allclose(case.forward(merged), expected, atol=1e-5, rtol=1e-5)
    assert set(merged.state_dict()) == set(case.build(0).state_dict())


@pytest.mark.parametrize(("method", "index"), PARAMS)
def test_attaching_twice_needs_a_new_name(method, index):
    case = _case(method, index)
    model = _attach(case, method, case.build(0))
    with pytest.raises(AdapterError, match="already attached"):
        _attach(case, method, model)


@pytest.mark.parametrize(("method", "index"), PARAMS)
def test_load_onto_another_base_fails_before_changing_it(method, index, tmp_path):
    case = _case(method, index)
    model = _attach(case, method, case.build(0))
    vp.save(model, tmp_path)
    other = case.build(0)
    # A different base: one extra parameter changes the fingerprint.
    other.register_parameter("extra", nn.Parameter(torch.zeros(3)))
    reference = copy.deepcopy(other.state_dict())
    with pytest.raises(AdapterMismatchError, match="another base model"):
        vp.load(other, tmp_path)
    assert get_state(other) is None
    assert list(other.state_dict()) == list(reference)


@pytest.mark.parametrize("method", METHODS)
def test_config_round_trips_through_json(method):
    cfg = vp.config(method, **CONFIG_KWARGS.get(method, {}))
    again = type(cfg).from_json(cfg.to_json())
    assert again == cfg
