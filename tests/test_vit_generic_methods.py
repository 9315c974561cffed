"""SSF, (IA)³ and the Houlsby / Pfeiffer adapters on timm ViTs: forwards, inits, counts, merge, round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import visionpeft as vp
from visionpeft.errors import AdapterError, ConfigError, UnsupportedModelError
from visionpeft.method import get_state, set_train_mode

timm = pytest.importorskip("timm")

from visionpeft.vit.adapter import Bottleneck, WithAdapter  # noqa: E402
from visionpeft.vit.ia3 import InputScale, KeyValueScale  # noqa: E402
from visionpeft.vit.ssf import ScaleShift  # noqa: E402

from tiny_models import tiny_vit  # noqa: E402

#: Each method (with its config) and the modules that own its trained tensors.
METHODS = {
    "ssf": ({}, (ScaleShift,)),
    "ssf-identity": ({"init": "identity"}, (ScaleShift,)),
    "ia3": ({}, (KeyValueScale, InputScale)),
    "houlsby": ({"variant": "houlsby"}, (Bottleneck,)),
    "pfeiffer": ({"variant": "pfeiffer"}, (Bottleneck,)),
}
VARIANTS = {"cls": {}, "reg-avg": {"reg_tokens": 2, "class_token": False, "global_pool": "avg"}}
HEAD = 768 * 10 + 10


def _registered(label: str) -> str:
    return {"houlsby": "adapter", "pfeiffer": "adapter", "ssf-identity": "ssf"}.get(label, label)


def _attach(label: str, model: nn.Module, **extra) -> nn.Module:
    return vp.attach(model, _registered(label), **METHODS[label][0], **extra)


def _images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _trained(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    return get_state(model).adapters[name].method.trained_tensors(model)


def _randomize(model: nn.Module, name: str = "default", seed: int = 1) -> None:
    """Give the adapter's tensors learned-looking values: scales around 1, everything else around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in _trained(model, name).items():
            noise = 0.2 * torch.randn(t.shape, generator=g)
            t.copy_(1 + noise if key.endswith(("scale", "ia3_k", "ia3_v", "ia3_ff")) else noise)


@pytest.fixture(scope="module")
def vit_base() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)


# ------------------------------------------------------------------------------------------ identity


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("label", ["ssf-identity", "ia3", "houlsby", "pfeiffer"])
def test_identity_at_attach_is_exact(label, variant):
    x = _images()
    with torch.no_grad():
        before = tiny_vit(0, **VARIANTS[variant]).eval()(x)
        after = _attach(label, tiny_vit(0, **VARIANTS[variant])).eval()(x)
    assert torch.equal(before, after)


def test_ssf_default_init_is_the_papers_and_not_the_identity(vit_base):
    x = _images()
    with torch.no_grad():
        before = tiny_vit(0).eval()(x)
        after = _attach("ssf", tiny_vit(0)).eval()(x)
    assert not torch.equal(before, after), "SSF's default init must not be a silent ones/zeros init"
    assert torch.allclose(before, after, atol=0.5)
    model = vp.attach(vit_base, "ssf")
    try:
        tensors = _trained(model)
        scales = torch.cat([t for k, t in tensors.items() if k.endswith("ssf_scale")]).detach()
        shifts = torch.cat([t for k, t in tensors.items() if k.endswith("ssf_shift")]).detach()
        assert scales.numel() == shifts.numel() == 102_912
        assert abs(scales.mean().item() - 1.0) < 1e-3 and abs(scales.std().item() - 0.02) < 1e-3
        assert abs(shifts.mean().item()) < 1e-3 and abs(shifts.std().item() - 0.02) < 1e-3
    finally:
        vp.detach(model)


# ---------------------------------------------------------------------------------- parameter counts


def _adapter_count(adapters_per_block: int, dim: int = 768, depth: int = 12, reduction: int = 16) -> int:
    width = dim // reduction
    return depth * adapters_per_block * (2 * dim * width + width + dim)


@pytest.mark.parametrize(
    ("label", "count"),
    [("ssf", 205_824), ("ia3", 55_296), ("houlsby", _adapter_count(2)), ("pfeiffer", _adapter_count(1))],
)
def test_parameter_counts_on_vit_base(vit_base, label, count):
    model = _attach(label, vit_base)
    try:
        assert vp.summary(model)["trainable"] == count + HEAD
        assert sum(t.numel() for t in _trained(model).values()) == count + HEAD
    finally:
        vp.detach(model)
    if label == "houlsby":
        assert count == 1_789_056
    if label == "pfeiffer":
        assert count == 894_528


# ------------------------------------------------------------------------------------- what trains


def _owned_names(model: nn.Module, owners: tuple[type, ...]) -> set[str]:
    names = set()
    for mname, module in model.named_modules():
        if isinstance(module, owners):
            # A wrapper's own vectors, but not the layer it wraps; a bottleneck's Linear layers.
            names |= {f"{mname}.{p}" for p, _ in module.named_parameters(recurse=isinstance(module, Bottleneck))}
    return names


@pytest.mark.parametrize("label", METHODS)
def test_only_the_methods_tensors_and_the_head_train(label):
    model = _attach(label, tiny_vit(0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n, _ in model.named_parameters() if n.startswith("head.copies.default.")}
    assert head == {"head.copies.default.weight", "head.copies.default.bias"}
    assert trainable == _owned_names(model, METHODS[label][1]) | head
    model(_images()).square().mean().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    d, hidden = 64, 128
    expected = {
        "ssf": 2 * (2 * (d + 3 * d + d + d + hidden + d) + d + d),
        "ia3": 2 * (d + d + hidden),
        "houlsby": 2 * 2 * (2 * d * 4 + 4 + d),
        "pfeiffer": 2 * (2 * d * 4 + 4 + d),
    }[label.removesuffix("-identity")]
    assert vp.summary(model)["trainable"] == expected + d * 10 + 10


@pytest.mark.parametrize("label", ["ssf", "ia3", "houlsby"])
def test_frozen_backbone_stays_in_eval_mode_while_training(label):
    model = _attach(label, tiny_vit(0, drop_rate=0.5, proj_drop_rate=0.5, drop_path_rate=0.5))
    set_train_mode(model, True)
    assert not model.blocks[0].training and model.head.training
    x = _images()
    assert torch.equal(model(x), model(x)), "the frozen backbone must not drop anything"


# ------------------------------------------------------------------------------------ SSF's forward


def _ssf_reference(vit: nn.Module, x: torch.Tensor, p: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The original's forward (dongzelian/SSF, tuning_mode='ssf') written out on timm's modules."""

    def ada(h: torch.Tensor, label: str) -> torch.Tensor:
        scale, shift = p[label]
        return h * scale + shift

    h = ada(vit.patch_embed.proj(x).flatten(2).transpose(1, 2), "patch_embed.proj")
    h = vit.norm_pre(vit._pos_embed(h))
    for i, blk in enumerate(vit.blocks):
        attn = blk.attn
        a = ada(blk.norm1(h), f"blocks.{i}.norm1")
        b, n, c = a.shape
        qkv = ada(attn.qkv(a), f"blocks.{i}.attn.qkv").reshape(b, n, 3, attn.num_heads, c // attn.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        h = h + ada(attn.proj(o), f"blocks.{i}.attn.proj")
        m = ada(blk.mlp.fc1(ada(blk.norm2(h), f"blocks.{i}.norm2")), f"blocks.{i}.mlp.fc1")
        h = h + ada(blk.mlp.fc2(blk.mlp.act(m)), f"blocks.{i}.mlp.fc2")
    return vit.forward_head(ada(vit.norm(h), "norm"))


def test_ssf_follows_the_originals_placements():
    model = _attach("ssf", tiny_vit(0)).eval()
    tensors = {k: t.detach() for k, t in _trained(model).items()}
    params = {k.removesuffix(".ssf_scale"): (t, tensors[k.replace("scale", "shift")])
              for k, t in tensors.items() if k.endswith(".ssf_scale")}
    blocks = [f"blocks.{i}.{n}" for i in range(2) for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                                            "mlp.fc2")]
    assert set(params) == {"patch_embed.proj", "norm", *blocks}
    reference = tiny_vit(0).eval()
    reference.head.load_state_dict(model.head.copies["default"].state_dict())
    x = _images()
    with torch.no_grad():
        assert torch.allclose(model(x), _ssf_reference(reference, x, params), atol=1e-5)


def test_ssf_on_an_average_pooled_vit_follows_fc_norm():
    model = _attach("ssf", tiny_vit(0, **VARIANTS["reg-avg"]))
    keys = set(_trained(model))
    assert "fc_norm.ssf_scale" in keys and "norm.ssf_scale" not in keys
    assert isinstance(model.fc_norm, ScaleShift) and isinstance(model.norm, nn.Identity)


# ---------------------------------------------------------------------------------- (IA)³'s forward


def _capture(module: nn.Module, store: dict, key: str, inputs: bool = False):
    def hook(mod, args, out):
        store[key] = (args[0] if inputs else out).detach()

    return module.register_forward_hook(hook)


def test_ia3_scales_only_keys_and_values():
    x, dim = _images(), 64
    base, seen = tiny_vit(0).eval(), {}
    _capture(base.blocks[0].attn.qkv, seen, "base")
    model = vp.attach(tiny_vit(0), "ia3").eval()
    wrapper = model.blocks[0].attn.qkv
    with torch.no_grad():
        for key, t in _trained(model).items():
            if key.startswith("blocks.0.attn.qkv."):
                t.fill_(2.0)  # every vector this adapter trains on qkv, so a q scale would show
    assert set(_trained(model)) >= {"blocks.0.attn.qkv.ia3_k", "blocks.0.attn.qkv.ia3_v"}
    _capture(wrapper, seen, "adapted")
    with torch.no_grad():
        base(x)
        model(x)
    raw, out = seen["base"], seen["adapted"]
    assert torch.equal(out[..., :dim], raw[..., :dim]), "the queries must not be scaled"
    assert torch.equal(out[..., dim:], 2 * raw[..., dim:])


def test_ia3_scales_the_mlp_hidden_activation():
    x, seen = _images(), {}
    base = tiny_vit(0).eval()
    _capture(base.blocks[0].mlp.fc2, seen, "base", inputs=True)
    model = vp.attach(tiny_vit(0), "ia3").eval()
    wrapper = model.blocks[0].mlp.fc2
    with torch.no_grad():
        wrapper.scale.fill_(3.0)
    _capture(wrapper.base, seen, "adapted", inputs=True)
    with torch.no_grad():
        base(x)
        model(x)
    assert seen["adapted"].shape[-1] == 128
    assert torch.equal(seen["adapted"], 3 * seen["base"])


def test_ia3_merge_changes_only_the_key_and_value_rows():
    dim = 64
    model = vp.attach(tiny_vit(0), "ia3")
    _randomize(model)
    lk = model.blocks[0].attn.qkv.k_scale.detach().clone()
    lff = model.blocks[0].mlp.fc2.scale.detach().clone()
    merged = vp.merge(model)
    base = tiny_vit(0)
    w, b = merged.blocks[0].attn.qkv.weight, merged.blocks[0].attn.qkv.bias
    w0, b0 = base.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.bias
    assert torch.equal(w[:dim], w0[:dim]) and torch.equal(b[:dim], b0[:dim])
    assert torch.allclose(w[dim : 2 * dim], lk[:, None] * w0[dim : 2 * dim])
    assert torch.allclose(b[dim : 2 * dim], lk * b0[dim : 2 * dim])
    assert torch.allclose(merged.blocks[0].mlp.fc2.weight, base.blocks[0].mlp.fc2.weight * lff)
    assert torch.equal(merged.blocks[0].mlp.fc2.bias, base.blocks[0].mlp.fc2.bias)


def test_ia3_refuses_key_normalisation():
    with pytest.raises(UnsupportedModelError, match="cannot adapt"):
        vp.attach(tiny_vit(0, qk_norm=True), "ia3")


# ----------------------------------------------------------------------------------------- adapters


def _adapter_reference(vit: nn.Module, x: torch.Tensor, adapters: dict[str, nn.Module]) -> torch.Tensor:
    """A pre-norm ViT with ``h + adapter(h)`` on the attention and MLP outputs named in ``adapters``."""

    def adapt(h: torch.Tensor, label: str) -> torch.Tensor:
        return h + adapters[label](h) if label in adapters else h

    h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    for i, blk in enumerate(vit.blocks):
        h = h + blk.ls1(adapt(blk.attn(blk.norm1(h)), f"blocks.{i}.attn"))
        h = h + blk.ls2(adapt(blk.mlp(blk.norm2(h)), f"blocks.{i}.mlp"))
    return vit.forward_head(vit.norm(h))


@pytest.mark.parametrize(("label", "positions"), [("houlsby", ("attn", "mlp")), ("pfeiffer", ("mlp",))])
def test_adapters_sit_on_the_sublayer_outputs_inside_the_residual(label, positions):
    model = _attach(label, tiny_vit(0, init_values=0.5)).eval()
    _randomize(model)
    adapters = {n.removesuffix(".base"): m.adapter for n, m in model.named_modules() if isinstance(m, WithAdapter)}
    assert set(adapters) == {f"blocks.{i}.{p}" for i in range(2) for p in positions}
    reference = tiny_vit(0, init_values=0.5).eval()
    reference.head.load_state_dict(model.head.copies["default"].state_dict())
    x = _images()
    with torch.no_grad():
        assert torch.allclose(model(x), _adapter_reference(reference, x, adapters), atol=1e-6)


@pytest.mark.parametrize("label", ["houlsby", "pfeiffer"])
def test_the_down_projection_keeps_its_init_and_learns_after_one_step(label):
    model = _attach(label, tiny_vit(0)).eval()
    adapters = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert all(not torch.all(a.down.weight == 0) for a in adapters)
    assert all(torch.all(a.up.weight == 0) and torch.all(a.up.bias == 0) for a in adapters)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    labels = torch.tensor([1, 7])
    for step in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(_images()), labels).backward()
        if step == 0:
            assert all(a.up.weight.grad.abs().sum() > 0 for a in adapters)
        optimizer.step()
    assert all(a.down.weight.grad.abs().sum() > 0 for a in adapters), "the down-projection must learn"


def test_adapter_activation_and_width():
    houlsby = vp.attach(tiny_vit(0), "adapter")
    pfeiffer = vp.attach(tiny_vit(0), "adapter", variant="pfeiffer")
    gelu = vp.attach(tiny_vit(0), "adapter", variant="pfeiffer", activation="gelu", reduction_factor=8)
    assert isinstance(houlsby.blocks[0].attn.adapter.act, nn.SiLU)
    assert isinstance(pfeiffer.blocks[0].mlp.adapter.act, nn.ReLU)
    assert isinstance(pfeiffer.blocks[0].attn, timm.models.vision_transformer.Attention)
    assert isinstance(gelu.blocks[0].mlp.adapter.act, nn.GELU)
    assert houlsby.blocks[0].mlp.adapter.down.out_features == 64 // 16
    assert gelu.blocks[0].mlp.adapter.down.out_features == 64 // 8
    with pytest.raises(ConfigError, match="reduction_factor"):
        vp.attach(tiny_vit(0), "adapter", reduction_factor=128)


# ------------------------------------------------------------------------------ merge and round trips


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("label", ["ssf", "ia3"])
def test_merge_equals_unmerged_and_leaves_a_plain_vit(label, variant):
    x = _images()
    model = _attach(label, tiny_vit(0, **VARIANTS[variant])).eval()
    _randomize(model)
    with torch.no_grad():
        expected = model(x)
        merged = vp.merge(model)
        out = merged(x)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    plain = tiny_vit(0, **VARIANTS[variant]).eval()
    assert {n: type(m) for n, m in merged.named_modules()} == {n: type(m) for n, m in plain.named_modules()}
    plain.load_state_dict(merged.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(x), out)


@pytest.mark.parametrize("label", METHODS)
def test_save_load_reproduces_outputs_bit_for_bit(label, tmp_path):
    x = _images()
    model = _attach(label, tiny_vit(0)).eval()
    _randomize(model)
    with torch.no_grad():
        expected = model(x)
    vp.save(model, tmp_path)
    loaded = vp.load(tiny_vit(0), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("label", METHODS)
def test_detach_restores_the_base_state_dict(label):
    model = tiny_vit(0)
    reference = copy.deepcopy(model.state_dict())
    adapted = _attach(label, model)
    _randomize(adapted)
    restored = vp.detach(adapted)
    state = restored.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    assert not any(isinstance(m, (ScaleShift, KeyValueScale, InputScale, WithAdapter)) for m in restored.modules())


def test_ssf_and_ia3_on_the_same_layers_merge_together():
    x = _images()
    model = vp.attach(vp.attach(tiny_vit(0), "ssf", name="s"), "ia3", name="i").eval()
    _randomize(model, "s")
    _randomize(model, "i", seed=2)
    with torch.no_grad():
        expected = model(x)
        merged = vp.merge(model)
        assert torch.allclose(merged(x), expected, atol=1e-5, rtol=1e-5)
    assert {n: type(m) for n, m in merged.named_modules()} == {n: type(m) for n, m in tiny_vit(0).named_modules()}


def test_ssf_over_ia3_refuses_to_merge_and_changes_nothing():
    x = _images()
    model = vp.attach(vp.attach(tiny_vit(0), "ia3", name="i"), "ssf", name="s").eval()
    _randomize(model, "i")
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(AdapterError, match=r"cannot merge: s \(ssf\)"):
        vp.merge(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert list(get_state(model).adapters) == ["i", "s"]


def test_sites_survive_block_wrapping_by_another_adapter():
    x = _images()
    model = vp.attach(vp.attach(tiny_vit(0), "adapter"), "adaptformer", name="af", bottleneck=4)
    model = vp.attach(model, "ia3", name="i").eval()
    _randomize(model, "i")
    with torch.no_grad():
        before = model(x)
        model.blocks[0].block.attn.base.qkv.k_scale.mul_(2)
        assert not torch.equal(model(x), before), "(IA)³ must still act inside the wrapped block"
    plain = vp.detach(model)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), tiny_vit(0).eval()(x))


def test_open_clip_is_refused():
    pytest.importorskip("open_clip")
    from tiny_models import tiny_clip

    for method in ("ssf", "ia3", "adapter"):
        with pytest.raises(UnsupportedModelError, match="timm VisionTransformer"):
            vp.attach(tiny_clip(), method)
