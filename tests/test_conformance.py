"""The conformance suite: every registered method passes it, with no per-method test code.

Parametrized over ``vp.methods()``: registering a method is enough to get it tested. ``CASES``
lists tiny real models of every family; each method runs on every case it supports, and a
registered method that supports none fails here instead of going untested.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.errors import AdapterError, AdapterMismatchError
from visionpeft.method import get_state
from visionpeft.registry import get_method

from tiny_models import tiny_clip, tiny_custom_text_clip, tiny_vit
from toy import toy_inputs, toy_net


@dataclass
class Case:
    """A tiny model of one family and its inputs; a method runs on every case it supports."""

    label: str
    build: Callable[[int], nn.Module]
    inputs: Callable[[], Any]

    def forward(self, model: nn.Module) -> torch.Tensor:
        return model(self.inputs())


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _clips() -> torch.Tensor:
    return torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def _video(seed: int) -> nn.Module:
    from visionpeft.vit.video import VideoClassifier

    return VideoClassifier(tiny_vit(seed), num_frames=4)


class ClipCase(Case):
    """An open_clip model: prompt learners map images to logits; other methods get CLIP's own logits."""

    def forward(self, model: nn.Module) -> torch.Tensor:
        from visionpeft.vla.prompts import PromptedCLIP

        images = self.inputs()
        if isinstance(model, PromptedCLIP):
            return model(images)
        image, text = model.encode_image(images), model.encode_text(_clip_tokens())
        return image @ text.T


def _clip_images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _clip_tokens() -> torch.Tensor:
    from tiny_models import clip_tokenizer

    return clip_tokenizer()(["a photo of a dog.", "a photo of a cat.", "a photo of a golden retriever."])


CASES: list[Case] = [Case("toy", lambda seed: toy_net(seed, dropout=0.0), toy_inputs)]
if importlib.util.find_spec("timm") is not None:
    CASES += [
        Case("vit", tiny_vit, _images),
        Case("vit-reg-avg", lambda seed: tiny_vit(seed, reg_tokens=2, class_token=False, global_pool="avg"), _images),
        Case("video", _video, _clips),
    ]
if importlib.util.find_spec("open_clip") is not None:
    CASES += [
        ClipCase("clip", tiny_clip, _clip_images),
        ClipCase("custom-text-clip", tiny_custom_text_clip, _clip_images),
    ]


class SDCase(Case):
    """A Stable Diffusion container: the UNet's prediction for noisy latents under prompts (and a condition).

    The prompts are tokenized by the model's own tokenizer at each call, so a textual-inversion
    placeholder (the default ``<concept>``) is one token once it is attached; the condition
    images feed a T2I-Adapter and are ignored without one.
    """

    def forward(self, model: nn.Module) -> torch.Tensor:
        latents, timesteps, condition = self.inputs()
        ids = model.tokenize(["a photo of <concept>", "a <concept> on the beach"])
        return model(latents, timesteps, ids["input_ids"], ids.get("input_ids_2"), condition)


_SD_MODELS: dict[int, nn.Module] = {}


def _tiny_sd(seed: int) -> nn.Module:
    # Built once per seed and copied: the tiny pipeline takes seconds to build, a copy milliseconds.
    if seed not in _SD_MODELS:
        from visionpeft.diffusion.models import StableDiffusionModel

        from tiny_models import tiny_sd_pipeline

        _SD_MODELS[seed] = StableDiffusionModel.from_pipeline(tiny_sd_pipeline(seed))
    return copy.deepcopy(_SD_MODELS[seed])


def _sd_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.rand(2, 3, 32, 32, generator=g)


if importlib.util.find_spec("diffusers") is not None:
    CASES += [SDCase("sd", _tiny_sd, _sd_inputs)]

# Config arguments a method needs beyond its defaults, and attach arguments sized for tiny models.
CONFIG_KWARGS: dict[str, dict[str, Any]] = {}
ATTACH_KWARGS: dict[str, dict[str, Any]] = {
    "vpt": {"num_tokens": 3, "deep": True},
    "adaptformer": {"bottleneck": 8},
    "st_adapter": {"bottleneck": 8, "positions": ["before_attn", "before_mlp"]},
    "coop": {"classnames": ["dog", "cat", "golden_retriever"], "n_ctx": 4},
    "cocoop": {"classnames": ["dog", "cat", "golden_retriever"], "text_chunk_size": 4},
    "maple": {"classnames": ["dog", "cat", "golden_retriever"], "prompt_depth": 2},
    "zeroshot": {"classnames": ["dog", "cat", "golden_retriever"]},
    "clip_adapter": {"classnames": ["dog", "cat", "golden_retriever"]},
    "kgcoop": {"classnames": ["dog", "cat", "golden_retriever"]},
}

METHODS = [m.name for m in vp.methods()]
PARAMS = [
    pytest.param(name, case, id=f"{name}-{case.label}")
    for name in METHODS
    for case in CASES
    if get_method(name).supports(case.build(0))
]


def _attach(case: Case, method: str, model: nn.Module, **extra: Any) -> nn.Module:
    return vp.attach(model, method, **ATTACH_KWARGS.get(method, {}), **extra)


def _perturb(model: nn.Module, seed: int = 7) -> None:
    """Move every trainable tensor away from its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_every_method_has_a_case():
    assert METHODS, "no method is registered: the entry points of the package are missing"
    covered = {p.values[0] for p in PARAMS}
    assert set(METHODS) == covered, f"methods without a conformance case: {sorted(set(METHODS) - covered)}"


@pytest.mark.parametrize(("method", "case"), [p for p in PARAMS if not get_method(p.values[0]).trains])
def test_baselines_that_train_nothing_freeze_everything(method, case):
    model = _attach(case, method, case.build(0))
    assert get_state(model).adapters["default"].method.trained_tensors(model) == {}
    assert not any(p.requires_grad for p in model.parameters())
    assert case.forward(model).grad_fn is None


@pytest.mark.parametrize(("method", "case"), [p for p in PARAMS if get_method(p.values[0]).trains])
def test_gradients_reach_only_trained_tensors(method, case):
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


@pytest.mark.parametrize(("method", "case"), [p for p in PARAMS if get_method(p.values[0]).starts_as_identity])
def test_identity_at_attach(method, case):
    model = case.build(0).eval()
    # The base frozen first, as attaching leaves it: nn.MultiheadAttention (CLIP) computes in a
    # different order when its weights require grad, even without autograd.
    model.requires_grad_(False)
    with torch.no_grad():
        before = case.forward(model)
        after = case.forward(_attach(case, method, model).eval())
    assert torch.equal(before, after)


@pytest.mark.parametrize(("method", "case"), PARAMS)
def test_save_load_reproduces_outputs(method, case, tmp_path):
    model = _attach(case, method, case.build(0)).eval()
    _perturb(model)
    expected = case.forward(model)
    vp.save(model, tmp_path)
    loaded = vp.load(case.build(0), tmp_path).eval()
    assert torch.equal(case.forward(loaded), expected)
    assert vp.summary(loaded)["trainable"] == vp.summary(model)["trainable"]


@pytest.mark.parametrize(("method", "case"), PARAMS)
def test_detach_restores_the_original(method, case):
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


@pytest.mark.parametrize(("method", "case"), PARAMS)
def test_merge(method, case):
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


@pytest.mark.parametrize(("method", "case"), PARAMS)
def test_attaching_twice_needs_a_new_name(method, case):
    model = _attach(case, method, case.build(0))
    with pytest.raises(AdapterError, match="already attached"):
        _attach(case, method, model)


@pytest.mark.parametrize(("method", "case"), PARAMS)
def test_load_onto_another_base_fails_before_changing_it(method, case, tmp_path):
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
