"""DoRA (``lora`` with ``dora: true``, peft's ``use_dora``): formula, identity, merge, files, fast path, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.errors import ConfigError
from visionpeft.generic import lora_fast
from visionpeft.method import get_state

timm = pytest.importorskip("timm")

from tiny_models import tiny_vit  # noqa: E402


def _images(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return get_state(model).adapters["default"].method.trained_tensors(model)


def _dora(seed: int = 0, **kwargs) -> nn.Module:
    return vp.attach(tiny_vit(seed), "lora", dora=True, **kwargs)


def _perturb(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in _trained(model).values():
            t.add_(0.1 * torch.randn(t.shape, generator=g))


def test_dora_is_off_by_default_and_round_trips_in_the_config():
    assert vp.config("lora").dora is False
    cfg = vp.config("lora", dora=True)
    assert type(cfg).from_json(cfg.to_json()).dora is True
    with pytest.raises(ConfigError, match="dora"):
        vp.config("lora", dora="yes")


def test_dora_is_exactly_the_base_model_at_attach():
    x = _images()
    with torch.no_grad():
        assert torch.equal(_dora().eval()(x), tiny_vit(0).eval()(x))


def test_dora_learns_a_magnitude_per_output_unit_and_computes_doras_formula():
    model = _dora(r=2, alpha=4.0).eval()
    tensors = _trained(model)
    mags = {k: t for k, t in tensors.items() if k.endswith("lora_magnitude_vector.weight")}
    assert len(mags) == 8  # 2 blocks x (qkv, proj, fc1, fc2)
    layer = model.blocks[0].attn.qkv
    weight = layer.base_layer.weight
    assert torch.equal(mags["blocks.0.attn.qkv.lora_magnitude_vector.weight"], weight.norm(dim=1))
    _perturb(model)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    x = torch.randn(3, 64)
    with torch.no_grad():
        updated = weight + (4.0 / 2) * b @ a
        expected = x @ (m.unsqueeze(1) * updated / updated.norm(dim=1, keepdim=True)).T + layer.base_layer.bias
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_dora_merges_into_the_plain_model():
    model = _dora().eval()
    _perturb(model)
    x = _images()
    with torch.no_grad():
        expected = model(x)
        merged = vp.merge(model)
        assert get_state(merged) is None
        assert set(merged.state_dict()) == set(tiny_vit(0).state_dict())
        assert torch.allclose(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_dora_save_load_reproduces_outputs_bit_for_bit(tmp_path):
    model = _dora().eval()
    _perturb(model)
    x = _images()
    with torch.no_grad():
        expected = model(x)
    vp.save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["config"]["dora"] is True
    loaded = vp.load(tiny_vit(0), tmp_path).eval()
    assert any(k.endswith("lora_magnitude_vector.weight") for k in _trained(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_gradients_reach_the_magnitudes_and_the_fast_path_is_never_taken(monkeypatch):
    calls = []
    original = lora_fast.MergedLoRALinear.apply

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(lora_fast.MergedLoRALinear, "apply", spy)
    plain = vp.attach(tiny_vit(0), "lora")
    plain(_images(batch=8)).square().mean().backward()  # rows enough for the fast path (lora_fast.MIN_ROWS_FACTOR)
    assert calls, "the spy must see the fast path of plain LoRA, or this test proves nothing"
    calls.clear()
    model = _dora()
    model.train()
    model(_images(batch=8)).square().mean().backward()
    assert not calls, "DoRA must run peft's own forward"
    mags = [t for k, t in _trained(model).items() if k.endswith("lora_magnitude_vector.weight")]
    assert mags and all(t.grad is not None and t.grad.abs().sum() > 0 for t in mags)


def test_dora_extra_parameters_on_vit_base():
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    targets = [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1"]
    model = vp.attach(vit, "lora", r=8, targets=targets, dora=True, train_head=False)
    mags = sum(t.numel() for k, t in _trained(model).items() if "lora_magnitude_vector" in k)
    lora = sum(t.numel() for k, t in _trained(model).items() if "lora_magnitude_vector" not in k)
    assert mags == 12 * (2304 + 3072) == 64_512
    assert lora == 12 * 8 * ((768 + 2304) + (768 + 3072))


def test_dora_is_refused_where_the_host_exports_plain_lora_files():
    pytest.importorskip("diffusers")
    from visionpeft.diffusion.models import StableDiffusionModel

    from tiny_models import tiny_sd_pipeline

    model = StableDiffusionModel.from_pipeline(tiny_sd_pipeline())
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ConfigError, match=r"^method\.dora: .*set method\.dora: false$"):
        vp.attach(model, "lora", dora=True)
    assert [n for n, _ in model.named_modules()] == names and get_state(model) is None


def test_dora_tensors_are_refused_by_the_lora_file_writers():
    pytest.importorskip("diffusers")
    from visionpeft.diffusion.lora_export import from_tensors
    from visionpeft.errors import AdapterError

    tensors = {"unet.a.lora_A.weight": torch.zeros(2, 4), "unet.a.lora_B.weight": torch.zeros(4, 2),
               "unet.a.lora_magnitude_vector.weight": torch.ones(4)}
    with pytest.raises(AdapterError, match="DoRA magnitude.*method.dora: false"):
        from_tensors(tensors, 2, 2.0, is_sdxl=False, version="sd_v1")
