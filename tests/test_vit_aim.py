"""AIM (``aim``) against the original's block written out by hand, its inits, counts and drop-path."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import visionpeft as vp
from visionpeft.errors import AdapterError, ConfigError, UnsupportedModelError
from visionpeft.method import get_state, set_train_mode
from visionpeft.registry import get_method

timm = pytest.importorskip("timm")

from visionpeft.vit.aim import AimAdapter, drop_path_rates  # noqa: E402
from visionpeft.vit.surface import encode_frames  # noqa: E402
from visionpeft.vit.video import VideoClassifier  # noqa: E402

from tiny_models import tiny_vit  # noqa: E402

FRAMES = 3
SSV2 = {"joint_scale": 1.0, "second_temporal_adapter": True}
RECIPES = [pytest.param({}, id="k400"), pytest.param(SSV2, id="ssv2")]


def _clips(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, FRAMES, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _video(**config) -> nn.Module:
    return vp.attach(VideoClassifier(tiny_vit(0), num_frames=FRAMES), "aim", **config)


def _method(model: nn.Module):
    return get_state(model).adapters["default"].method


def _randomize_trained(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _adapters(model: nn.Module) -> dict[str, AimAdapter]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AimAdapter)}


def _branch(adapter: AimAdapter, h: torch.Tensor) -> torch.Tensor:
    return adapter.fc2(F.gelu(adapter.fc1(h)))


def _reference_block(block: nn.Module, x: torch.Tensor, frames: int) -> torch.Tensor:
    """The original's ``ResidualAttentionBlock.forward`` on the timm block's frozen parts, in loops.

    Temporal: every token position (class token included) of every clip is its own sequence over
    the frames, through the same ``norm1`` and attention, then the adapter without skip; spatial:
    ``a + adapter(a)``; joint: ``mlp(norm2(x)) + scale · adapter(norm2(x))``.
    """
    b, temporal, joint = block.block, block.before_attn["default"], block.beside_mlp["default"]
    spatial = b.attn
    attn = spatial.base
    steps = torch.zeros_like(x)
    for clip in range(x.shape[0] // frames):
        rows = slice(clip * frames, (clip + 1) * frames)
        for token in range(x.shape[1]):
            h = b.norm1(x[rows, token]).unsqueeze(0)
            if temporal.adapter_in is not None:
                h = h + _branch(temporal.adapter_in, h)
            steps[rows, token] = _branch(temporal.adapter, attn(h))[0]
    x = x + steps
    a = attn(b.norm1(x))
    x = x + a + _branch(spatial.adapter, a)
    xn = b.norm2(x)
    return x + b.mlp(xn) + joint.scale * _branch(joint.adapter, xn)


@pytest.mark.parametrize("config", RECIPES)
def test_identity_at_attach_is_exact(config):
    base = VideoClassifier(tiny_vit(0), num_frames=FRAMES).eval().requires_grad_(False)
    clips = _clips()
    with torch.no_grad():
        before = base(clips)
        after = vp.attach(base, "aim", **config).eval()(clips)
    assert torch.equal(before, after)


@pytest.mark.parametrize("config", RECIPES)
def test_block_matches_the_original_forward(config):
    model = _video(**config).eval()
    _randomize_trained(model)
    block = model.vit.blocks[1]
    assert block.beside_mlp["default"].scale == (1.0 if config else 0.5)
    x = torch.randn(2 * FRAMES, 17, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(block(x), _reference_block(block, x, FRAMES), atol=1e-5)


def test_only_the_last_fc_starts_at_zero_and_both_learn():
    model = _video(**SSV2)
    adapters = _adapters(model)
    assert len(adapters) == 2 * 4  # two blocks, four adapters each in the SSv2 recipe
    for name, adapter in adapters.items():
        assert adapter.fc1.weight.abs().sum() > 0 and 0.01 < float(adapter.fc1.weight.detach().std()) < 0.03, name
        assert not adapter.fc1.bias.any() and not adapter.fc2.weight.any() and not adapter.fc2.bias.any(), name
    set_train_mode(model, True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    # The gradients checked are those after two steps: the second temporal adapter sits behind the
    # first one, whose fc2 only leaves zero after step one, so its own fc2 only moves at step two.
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(_clips()), torch.tensor([1, 2])).backward()
        optimizer.step()
    for name, adapter in adapters.items():
        assert adapter.fc1.weight.grad.abs().sum() > 0, name
        assert adapter.fc2.weight.grad.abs().sum() > 0, name


def test_temporal_embedding_is_added_per_frame_to_every_token_before_norm_pre():
    model = _video().eval()
    vit = model.vit
    embedding = vit.aim_temporal_embedding["default"].embedding
    assert embedding.shape == (FRAMES, 64) and not embedding.any()
    with torch.no_grad():
        embedding.normal_()
    seen = {}
    vit.norm_pre.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    clips = _clips()
    with torch.no_grad():
        encode_frames(vit, clips.flatten(0, 1))
        plain = vit.patch_drop(vit._pos_embed(vit.patch_embed(clips.flatten(0, 1))))
    expected = (plain.view(2, FRAMES, 17, 64) + embedding[None, :, None]).view(2 * FRAMES, 17, 64)
    assert torch.equal(seen["x"], expected)  # the class token (position 0) gets it too


def test_drop_path_drops_token_positions_linearly_over_depth():
    assert drop_path_rates(0.2, 3) == pytest.approx([0.0, 0.1, 0.2])
    model = _video(drop_path_rate=0.5)
    _randomize_trained(model)
    temporal = model.vit.blocks[1].before_attn["default"]
    joint = model.vit.blocks[1].beside_mlp["default"]
    assert temporal.drop_path.rate == joint.drop_path.rate == 0.5
    assert model.vit.blocks[0].before_attn["default"].drop_path.rate == 0.0
    x = torch.randn(4 * FRAMES, 17, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = temporal.eval()(x) - x
        temporal.train()
        torch.manual_seed(0)
        kept = temporal(x) - x
    dropped = (kept == 0).all(dim=2)  # (frames of the batch, token positions)
    # One mask per token position, shared by every clip and frame; kept branches are scaled by 1 / keep.
    assert dropped.any() and not dropped.all()
    assert (dropped == dropped[:1]).all()
    assert torch.allclose(kept[:, ~dropped[0]], 2 * full[:, ~dropped[0]], atol=1e-6)
    with torch.no_grad():
        assert torch.equal(joint.eval()(x), joint.scale * _branch(joint.adapter, model.vit.blocks[1].block.norm2(x)))


@pytest.mark.parametrize("frames", [8, 32])
def test_parameter_counts_match_the_original_on_vit_b16(frames):
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    dim, hidden, depth = 768, int(768 * 0.25), 12
    # The original's Adapter: D_fc1 (dim -> hidden) and D_fc2 (hidden -> dim), both with biases.
    adapter = dim * hidden + hidden + hidden * dim + dim
    assert adapter == 295_872
    for config, per_block, adapters_total in (({}, 3, 10_651_392), (SSV2, 4, 14_201_856)):
        model = vp.attach(VideoClassifier(vit, num_frames=frames), "aim", **config)
        own = _method(model).own_tensors(model)
        adapters = sum(t.numel() for k, t in own.items() if k != "temporal_embedding.embedding")
        assert adapters == depth * per_block * adapter == adapters_total
        assert own["temporal_embedding.embedding"].numel() == frames * dim
        assert vp.summary(model)["trainable"] == adapters_total + frames * dim + (dim * 10 + 10)
        vp.detach(model)


def test_gradients_reach_only_adapters_temporal_embedding_and_head():
    model = _video(**SSV2)
    set_train_mode(model, True)
    model(_clips()).square().mean().backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in model.named_parameters() if p.grad is not None}
    own = ("adapter.", "adapter_in.", "aim_temporal_embedding.", "vit.head.copies.default.")
    assert all(any(part in n for part in own) for n in trained), sorted(trained)
    assert model.vit.aim_temporal_embedding["default"].embedding.grad.abs().sum() > 0
    # The frozen backbone stays in eval mode; the adapters (and their drop-path) follow train mode.
    frozen = [n for n, m in model.named_modules()
              if not n.startswith("vit.head") and any(not p.requires_grad for p in m.parameters(recurse=False))]
    assert frozen and not [n for n in frozen if model.get_submodule(n).training]
    assert model.vit.blocks[1].before_attn["default"].drop_path.training


def test_save_load_reproduces_outputs_bit_for_bit_and_merge_is_refused(tmp_path):
    model = _video(**SSV2, drop_path_rate=0.1).eval()
    _randomize_trained(model)
    clips = _clips()
    with torch.no_grad():
        expected = model(clips)
    vp.save(model, tmp_path)
    loaded = vp.load(VideoClassifier(tiny_vit(0), num_frames=FRAMES), tmp_path).eval()
    assert _method(loaded).config == _method(model).config
    with torch.no_grad():
        assert torch.equal(loaded(clips), expected)
    with pytest.raises(AdapterError, match="cannot merge"):
        vp.merge(loaded)


def test_two_aim_adapters_detach_back_to_the_base():
    base = VideoClassifier(tiny_vit(0), num_frames=FRAMES)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = vp.attach(vp.attach(base, "aim"), "aim", name="b", **SSV2)
    assert set(model.vit.aim_temporal_embedding) == {"default", "b"}
    restored = vp.detach(vp.detach(model, "b"))
    assert not hasattr(restored.vit, "aim_temporal_embedding")
    assert list(restored.state_dict()) == list(reference)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in reference.items())


def test_refuses_images_and_bad_configs():
    assert not get_method("aim").supports(tiny_vit(0))
    with pytest.raises(UnsupportedModelError, match="VideoClassifier"):
        vp.attach(tiny_vit(0), "aim")
    with pytest.raises(ConfigError, match="mlp_ratio"):
        vp.attach(VideoClassifier(tiny_vit(0), num_frames=FRAMES), "aim", mlp_ratio=0.001)
    with pytest.raises(ConfigError):
        vp.config("aim", drop_path_rate=1.0)
