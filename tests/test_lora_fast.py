"""LoRA's merged-weight training path: peft's gradients, peft's files, and peft's forward where it does not apply."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from torch import nn

import visionpeft as vp
from visionpeft.generic import lora_fast
from visionpeft.generic.lora import set_fast_path

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2,
                             num_classes=5)


def _trained_lora(**kwargs) -> nn.Module:
    """A ViT with LoRA whose B is non-zero, so every gradient and the update itself are non-trivial."""
    model = vp.attach(_vit(), "lora", r=4, alpha=12.0, **kwargs)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.2)
    return model.train()


@pytest.fixture
def merged_calls(monkeypatch):
    """How many times the merged-weight function ran since the test started."""
    calls = []
    apply = lora_fast.MergedLoRALinear.apply

    def counting(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(lora_fast.MergedLoRALinear, "apply", counting)
    return calls


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _grads(model: nn.Module, images: torch.Tensor, autocast: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    images = images.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(images)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads["input"] = images.grad
    grads["output"] = out.detach().float()
    return grads


def test_gradients_equal_peft_formulation(merged_calls):
    fast = _trained_lora()
    reference = copy.deepcopy(fast)
    assert set_fast_path(reference, False) == 8
    images = torch.randn(6, 3, 32, 32)
    expected = _grads(reference, images)
    assert not merged_calls
    got = _grads(fast, images)
    assert len(merged_calls) == 8  # 2 blocks x (qkv, proj, fc1, fc2)
    assert set(got) == set(expected) and any(".lora_A." in n for n in got)
    for name, value in expected.items():
        assert _relative(got[name], value) < 1e-5, name


def test_bias_scaling_and_leading_dimensions_of_one_layer(merged_calls):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7))
    inject_adapter_in_model(LoraConfig(r=3, lora_alpha=9, target_modules=["0"]), model)
    layer = model[0]
    layer.base_layer.bias.requires_grad_(True)  # a trained bias (peft's bias="all") gets its gradient too
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    reference = copy.deepcopy(model)
    lora_fast.enable(model)
    x = torch.randn(2, 5, 12)

    def grads(m: nn.Module) -> list[torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        return [out.detach(), xi.grad, *(p.grad for p in m.parameters() if p.requires_grad)]

    expected, got = grads(reference), grads(model)
    assert len(merged_calls) == 1 and len(got) == 5  # output, input, bias, A, B
    for a, b in zip(got, expected, strict=True):
        assert _relative(a, b) < 1e-5


def test_zero_init_adapter_leaves_training_outputs_bit_identical(merged_calls):
    plain = _vit().train()
    model = vp.attach(copy.deepcopy(plain), "lora", r=4).train()
    images = torch.randn(6, 3, 32, 32)
    assert torch.equal(model(images), plain(images))
    assert len(merged_calls) == 8


def test_low_precision_takes_peft_s_forward(merged_calls):
    """In bf16 the merged weight W + sBA would be rounded to W's 8 mantissa bits, erasing small updates."""
    fast = _trained_lora()
    reference = copy.deepcopy(fast)
    set_fast_path(reference, False)
    images = torch.randn(6, 3, 32, 32)
    expected, got = _grads(reference, images, torch.bfloat16), _grads(fast, images, torch.bfloat16)
    assert not merged_calls
    assert all(torch.equal(got[n], v) for n, v in expected.items())
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        _grads(fast, images)
        assert not merged_calls
    finally:
        torch.set_float32_matmul_precision(previous)
    _grads(fast, images)
    assert len(merged_calls) == 8


def _two_adapters(model: nn.Module) -> nn.Module:
    return vp.attach(model, "lora", name="second", r=2, train_head=False)


def _merged_by_peft(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if lora_fast.is_fast(module):
            module.merge()
    return model


def _base_trains(model: nn.Module) -> nn.Module:
    model.blocks[0].attn.qkv.base_layer.weight.requires_grad_(True)
    return model


@pytest.mark.parametrize(("case", "make", "expected_calls"), [
    ("dropout in training", lambda: _trained_lora(dropout=0.1), 0),
    ("two active adapters", lambda: _two_adapters(_trained_lora()), 0),
    ("merged by peft", lambda: _merged_by_peft(_trained_lora()), 0),
    ("a base weight that trains", lambda: _base_trains(_trained_lora()), 7),
])
def test_falls_back_to_peft_where_the_path_does_not_apply(merged_calls, case, make, expected_calls):
    model = make()
    reference = copy.deepcopy(model)
    set_fast_path(reference, False)
    images = torch.randn(6, 3, 32, 32)
    torch.manual_seed(3)
    expected = _grads(reference, images)
    torch.manual_seed(3)
    got = _grads(model, images)
    assert len(merged_calls) == expected_calls, case
    if expected_calls == 0:
        assert all(torch.equal(got[n], v) for n, v in expected.items()), case


def test_no_gradient_and_eval_dropout(merged_calls):
    model = _trained_lora(dropout=0.1).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert not merged_calls  # evaluation without gradients is peft's forward
    model(torch.randn(6, 3, 32, 32))
    assert len(merged_calls) == 8  # dropout in eval mode is the identity: the path applies


def test_small_batches_take_peft_s_forward(merged_calls):
    """Below MIN_ROWS_FACTOR * in*out/(in+out) rows, forming W + sBA twice costs more than peft's extra work."""
    model = _trained_lora()
    _grads(model, torch.randn(1, 3, 32, 32))  # 17 rows; qkv (64 -> 192) needs 72, fc1 / fc2 64, proj 48
    assert not merged_calls
    _grads(model, torch.randn(3, 3, 32, 32))  # 51 rows: proj only, in both blocks
    assert len(merged_calls) == 2
    rows, qkv = torch.randn(72, 64), torch.empty(192, 64)
    assert lora_fast.enough_rows(rows, qkv) and not lora_fast.enough_rows(rows[:71], qkv)


def test_names_files_and_pickling_are_peft_s(tmp_path):
    fast = _trained_lora()
    reference = copy.deepcopy(fast)
    set_fast_path(reference, False)
    assert list(fast.state_dict()) == list(reference.state_dict())
    vp.save(fast, tmp_path / "fast")
    vp.save(reference, tmp_path / "reference")
    configs = [json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("fast", "reference")]
    for config in configs:  # the file's checksum: the header's key order is the writer's own, not ours
        config["weights"].pop("sha256")
    assert configs[0] == configs[1]
    files = [safe_open(tmp_path / side / "adapter.safetensors", "pt") for side in ("fast", "reference")]
    assert files[0].metadata() == files[1].metadata()
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0].get_tensor(k), files[1].get_tensor(k)) for k in files[0].keys())  # noqa: SIM118
    layer = fast.blocks[0].attn.qkv
    assert repr(layer) == repr(reference.blocks[0].attn.qkv)
    assert lora_fast.is_fast(pickle.loads(pickle.dumps(fast)).blocks[0].attn.qkv)
    assert lora_fast.is_fast(copy.deepcopy(fast).blocks[0].attn.qkv)
    loaded = vp.load(_vit(), tmp_path / "fast")
    assert lora_fast.is_fast(loaded.blocks[0].attn.qkv)


def test_merge_and_detach_leave_plain_linear_layers():
    model = _trained_lora()
    assert vp.detach(copy.deepcopy(model)).blocks[0].attn.qkv.__class__ is nn.Linear
    assert vp.merge(model).blocks[0].attn.qkv.__class__ is nn.Linear


def test_per_backend_precision_api_takes_peft_s_forward(merged_calls):
    """torch's per-backend fp32 precision (here oneDNN's bf16 matmuls) is low precision, and the legacy query raises."""
    model = _trained_lora()
    previous = torch.backends.mkldnn.matmul.fp32_precision
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        _grads(model, torch.randn(6, 3, 32, 32))
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous
    assert not merged_calls


def test_hooks_and_forward_mode_ad_take_peft_s_forward(merged_calls):
    model = _trained_lora()
    images = torch.randn(6, 3, 32, 32)
    seen = []
    handle = model.blocks[0].attn.qkv.lora_A["default"].register_forward_hook(lambda *_: seen.append(1))
    _grads(model, images)
    handle.remove()
    assert seen and len(merged_calls) == 7  # the hooked layer ran peft's forward, its hook with it
    merged_calls.clear()
    glob = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        _grads(model, images)
    finally:
        glob.remove()
    assert not merged_calls
    import torch.autograd.forward_ad as fwad
    from peft import LoraConfig, inject_adapter_in_model

    layer = nn.Sequential(nn.Linear(12, 7))  # timm's attention has no forward AD on CPU: one layer
    inject_adapter_in_model(LoraConfig(r=3, lora_alpha=3, target_modules=["0"]), layer)
    layer[0].base_layer.requires_grad_(False)
    lora_fast.enable(layer)
    x = torch.randn(64, 12)
    layer(x).sum().backward()
    assert len(merged_calls) == 1
    with fwad.dual_level():
        tangent = fwad.unpack_dual(layer(fwad.make_dual(x, torch.randn_like(x)))).tangent
    assert tangent is not None and len(merged_calls) == 1
