"""LoRA through peft: the math, the targets, and a real timm ViT through visionpeft.vit's host."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.method import get_state

from toy import toy_inputs, toy_net

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


def _vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2,
                             num_classes=5)


def test_update_is_alpha_over_r_times_ba():
    model = vp.attach(toy_net(), "lora", r=2, alpha=6.0, targets=["blocks.0.fc1"], train_head=False)
    layer = model.blocks[0].fc1
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + (6.0 / 2) * x @ a.T @ b.T
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_b_starts_at_zero_and_gaussian_init_is_available():
    model = vp.attach(toy_net(), "lora", init="gaussian")
    layer = model.blocks[0].fc1
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert 0.1 < layer.lora_A["default"].weight.std().item() * 2 < 10  # N(0, 1/r)


def test_dropout_applies_only_in_training():
    model = vp.attach(toy_net(), "lora", dropout=0.5, targets=["blocks.0.fc1"])
    with torch.no_grad():
        model.blocks[0].fc1.lora_B["default"].weight.fill_(1.0)
    x = toy_inputs()
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    assert not torch.equal(first, model(x))


def test_vit_targets_are_exact_and_never_the_patch_embedding():
    model = vp.attach(_vit(), "lora", r=4)
    adapted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n})
    assert len(adapted) == 8  # 2 blocks x (qkv, proj, fc1, fc2)
    assert all(n.startswith("blocks.") for n in adapted)
    assert isinstance(model.patch_embed.proj, nn.Conv2d)
    d, hidden = 64, 128
    per_block = 4 * (d + 3 * d) + 4 * (d + d) + 4 * (d + hidden) + 4 * (hidden + d)
    head = d * 5 + 5
    assert vp.summary(model)["trainable"] == 2 * per_block + head


def test_vit_round_trip_merge_and_detach(tmp_path):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = vp.attach(_vit(), "lora", r=4, alpha=8.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    out = model(x)
    vp.save(model, tmp_path)
    loaded = vp.load(_vit(), tmp_path).eval()
    assert torch.equal(loaded(x), out)
    merged = vp.merge(loaded)
    assert type(merged.blocks[0].attn.qkv) is nn.Linear
    assert torch.allclose(merged(x), out, atol=1e-5)
    plain = vp.detach(model)
    assert torch.equal(plain(x), _vit().eval()(x))


def test_two_lora_adapters_are_both_active():
    model = vp.attach(toy_net(), "lora", name="a", targets=["blocks.0.fc1"], train_head=False)
    model = vp.attach(model, "lora", name="b", targets=["blocks.0.fc1"], train_head=False)
    layer = model.blocks[0].fc1
    assert sorted(layer.active_adapters) == ["a", "b"]
    x = torch.randn(2, 16)
    with torch.no_grad():
        layer.lora_B["a"].weight.fill_(0.1)
        layer.lora_B["b"].weight.fill_(-0.2)
    delta = sum(
        x @ layer.lora_A[n].weight.T @ layer.lora_B[n].weight.T * layer.scaling[n] for n in ("a", "b")
    )
    assert torch.allclose(layer(x), layer.base_layer(x) + delta, atol=1e-6)
    keys = set(get_state(model).adapters["b"].method.trained_tensors(model))
    assert keys == {"blocks.0.fc1.lora_A.weight", "blocks.0.fc1.lora_B.weight"}
