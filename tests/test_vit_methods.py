"""visionpeft.vit methods against direct re-computations of the papers' forwards and formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.errors import UnsupportedModelError
from visionpeft.method import get_state, set_train_mode

timm = pytest.importorskip("timm")

from visionpeft.vit.surface import AdaptedBlock  # noqa: E402
from visionpeft.vit.video import VideoClassifier  # noqa: E402
from visionpeft.vit.vpt import init_bound  # noqa: E402

from tiny_models import tiny_vit  # noqa: E402


def _images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _randomize(module: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _vpt_reference(vit, x, prompts: torch.Tensor, deep: bool) -> torch.Tensor:
    """VPT's forward as KMnP/vpt writes it, on timm's modules: insert after the prefix, replace per layer."""
    start, p = vit.num_prefix_tokens, prompts.shape[1]
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    h = torch.cat([h[:, :start], prompts[0].expand(len(x), -1, -1), h[:, start:]], dim=1)
    for i, block in enumerate(vit.blocks):
        if deep and i > 0:
            h = torch.cat([h[:, :start], prompts[i].expand(len(x), -1, -1), h[:, start + p :]], dim=1)
        h = block(h)
    h = vit.norm(h)
    h = torch.cat([h[:, :start], h[:, start + p :]], dim=1)
    return vit.forward_head(h)


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("variant", [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}])
def test_vpt_matches_the_papers_forward(deep, variant):
    x = _images()
    model = vp.attach(tiny_vit(0, **variant), "vpt", num_tokens=3, deep=deep).eval()
    prompts = model.vpt_prompts["default"].prompts
    assert prompts.shape == ((2 if deep else 1), 3, 64)
    with torch.no_grad():
        prompts.normal_()
        model.head.copies["default"].weight.normal_()
    reference = tiny_vit(0, **variant).eval()
    reference.head.load_state_dict(model.head.copies["default"].state_dict())
    assert torch.allclose(model(x), _vpt_reference(reference, x, prompts.detach(), deep), atol=1e-6)


def test_deep_prompts_replace_the_previous_outputs():
    model = vp.attach(tiny_vit(0), "vpt", num_tokens=2, deep=True).eval()
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, a, out: seen.setdefault("in1", a[0]))
    model(_images())
    inserted = seen["in1"][:, 1:3]
    assert torch.equal(inserted, model.vpt_prompts["default"].prompts[1].expand(2, -1, -1))


def test_vpt_init_bound_and_parameter_counts_on_vit_base():
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    assert math.isclose(init_bound(vit), 0.0625)
    model = vp.attach(vit, "vpt", num_tokens=50, deep=True)
    prompts = model.vpt_prompts["default"].prompts
    assert prompts.numel() == 12 * 50 * 768 == 460_800
    assert prompts.abs().max() <= 0.0625 and prompts.abs().max() > 0.06
    assert vp.summary(model)["trainable"] == 460_800 + 768 * 10 + 10
    vp.detach(model)
    model = vp.attach(vit, "adaptformer")
    assert vp.summary(model)["trainable"] - (768 * 10 + 10) == 1_189_632
    vp.detach(model)
    video = vp.attach(VideoClassifier(vit, num_frames=8), "st_adapter")
    assert vp.summary(video)["trainable"] - (768 * 10 + 10) == 7_110_144
    vp.detach(video)
    both = vp.attach(VideoClassifier(vit, num_frames=8), "st_adapter", positions=["before_attn", "before_mlp"])
    assert vp.summary(both)["trainable"] - (768 * 10 + 10) == 14_220_288


def test_adaptformer_branch_is_parallel_to_the_mlp_and_reads_the_residual():
    model = vp.attach(tiny_vit(0), "adaptformer", bottleneck=8).eval()
    block = model.blocks[0]
    assert isinstance(block, AdaptedBlock)
    adapter = block.beside_mlp["default"]
    _randomize(adapter)
    b = block.block
    x = torch.randn(2, 17, 64)
    h = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
    expected = h + b.drop_path2(b.ls2(b.mlp(b.norm2(h)))) + 0.1 * adapter.up(torch.relu(adapter.down(h)))
    assert torch.allclose(block(x), expected, atol=1e-6)
    assert float(adapter.scale) == pytest.approx(0.1)


def test_adaptformer_learnable_scale_and_layers():
    model = vp.attach(tiny_vit(0), "adaptformer", bottleneck=4, learnable_scale=True, layers=[1])
    assert not isinstance(model.blocks[0], AdaptedBlock)
    keys = set(get_state(model).adapters["default"].method.trained_tensors(model))
    assert "blocks.1.adaptformer.scale" in keys and not any(k.startswith("blocks.0.") for k in keys)
    with pytest.raises(ValueError, match="out of range"):
        vp.attach(tiny_vit(0), "adaptformer", layers=[5])


def test_st_adapter_convolves_over_time_on_patch_tokens_only():
    video = vp.attach(VideoClassifier(tiny_vit(0), num_frames=4), "st_adapter", bottleneck=6).eval()
    adapter = video.vit.blocks[0].before_mlp["default"]
    _randomize(adapter)
    x = torch.randn(2 * 4, 17, 64)
    out = adapter(x)
    assert torch.equal(out[:, 0], x[:, 0])  # the class token bypasses the adapter
    y = adapter.fc1(x[:, 1:]).view(2, 4, 4, 4, 6).permute(0, 4, 1, 2, 3)
    w = adapter.conv.weight  # (6, 1, 3, 1, 1): a temporal depth-wise kernel
    padded = nn.functional.pad(y, (0, 0, 0, 0, 1, 1))
    conv = sum(w[:, 0, k].view(1, 6, 1, 1, 1) * padded[:, :, k : k + 4] for k in range(3))
    conv = conv + adapter.conv.bias.view(1, 6, 1, 1, 1)
    expected = x[:, 1:] + adapter.fc2(conv.permute(0, 2, 3, 4, 1).reshape(8, 16, 6))
    assert torch.allclose(out[:, 1:], expected, atol=1e-5)


def test_st_adapter_positions_follow_the_original():
    video = vp.attach(VideoClassifier(tiny_vit(0), num_frames=2), "st_adapter", bottleneck=4, layers=1,
                      positions=["before_attn", "before_mlp"])
    assert not isinstance(video.vit.blocks[0], AdaptedBlock)
    block = video.vit.blocks[1]
    assert set(block.before_attn) == {"default"} and set(block.before_mlp) == {"default"}
    with pytest.raises(UnsupportedModelError, match="VideoClassifier"):
        vp.attach(tiny_vit(0), "st_adapter")


def test_video_classifier_averages_frames_before_the_norm():
    vit = tiny_vit(0).eval()
    video = VideoClassifier(vit, num_frames=3)
    clips = torch.randn(2, 3, 3, 32, 32)
    frames = clips.flatten(0, 1)
    tokens = vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(frames))))
    expected = vit.head(vit.norm(tokens[:, 0].view(2, 3, -1).mean(1)))
    assert torch.allclose(video(clips), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 3, C, H, W\)"):
        video(torch.randn(2, 4, 3, 32, 32))


@pytest.mark.parametrize("method", ["vpt", "adaptformer", "linear", "lora", "bitfit"])
def test_frozen_backbone_stays_in_eval_mode_while_training(method):
    model = vp.attach(tiny_vit(0, drop_rate=0.5, drop_path_rate=0.5), method)
    set_train_mode(model, True)
    assert not model.blocks[0].training and not model.head_drop.training
    assert model.head.training
    x = _images()
    assert torch.equal(model(x), model(x)), "the frozen backbone must not drop anything"
    if method == "vpt":
        assert model.vpt_prompts["default"].training
    if method == "lora":
        assert model.blocks[0].attn.qkv.lora_dropout["default"].training


def test_full_fine_tuning_and_stacked_adapters_train_together():
    model = vp.attach(tiny_vit(0, drop_rate=0.5), "full")
    set_train_mode(model, True)
    assert model.blocks[0].training and model.head_drop.training
    stacked = vp.attach(vp.attach(tiny_vit(0), "vpt", num_tokens=2, dropout=0.1), "adaptformer", name="af")
    set_train_mode(stacked, True)
    assert stacked.vpt_prompts["default"].training and stacked.blocks[0].beside_mlp["af"].training
    assert not stacked.blocks[0].block.training


def test_other_families_get_a_clear_error():
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    for method in ("vpt", "adaptformer", "linear"):
        with pytest.raises(UnsupportedModelError, match="timm VisionTransformer"):
            vp.attach(convnext, method)
    with pytest.raises(UnsupportedModelError, match="cannot adapt"):
        vp.attach(convnext, "lora")


def test_lora_on_a_vit_never_catches_the_patch_embedding():
    model = vp.attach(tiny_vit(0), "lora")
    assert type(model.patch_embed.proj) is nn.Conv2d
    assert len([n for n, _ in model.named_modules() if n.endswith("lora_A")]) == 2 * 4


def test_deep_prompts_survive_block_wrapping_by_another_adapter():
    x = _images()
    model = vp.attach(tiny_vit(0), "vpt", num_tokens=2, deep=True).eval()
    model = vp.attach(model, "adaptformer", name="af", bottleneck=4).eval()
    before = model(x)
    with torch.no_grad():
        model.vpt_prompts["default"].prompts[1].add_(1.0)  # only the deep prompts of block 1
    assert not torch.equal(model(x), before), "deep prompts must still enter block 1"
    plain = vp.detach(vp.detach(model, "af"))
    assert not plain.blocks[1]._forward_pre_hooks and torch.equal(plain(x), tiny_vit(0).eval()(x))


def test_prompt_dropout_draws_a_mask_per_sample():
    model = vp.attach(tiny_vit(0), "vpt", num_tokens=4, dropout=0.5)
    prompts = model.vpt_prompts["default"]
    prompts.train()
    batch = prompts.layer(0, 8)
    assert not all(torch.equal(batch[0], batch[i]) for i in range(1, 8))


def test_full_fine_tuning_trains_a_frozen_model_too():
    vit = tiny_vit(0).requires_grad_(False)
    model = vp.attach(vit, "full")
    assert vp.summary(model)["trainable"] == vp.summary(model)["total"]
    restored = vp.detach(model)
    assert not any(p.requires_grad for p in restored.parameters())
