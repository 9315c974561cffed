"""Prefix tuning and zero-init gated prompts on timm ViTs: closed forms, identity, gradients, folding, counts."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.errors import ConfigError
from visionpeft.method import RunInfo, get_state

timm = pytest.importorskip("timm")

from timm.layers.attention import Attention  # noqa: E402

from visionpeft.vit.attention import ExtendedAttention  # noqa: E402
from visionpeft.vit.gated_prompt import GatedPrompts  # noqa: E402
from visionpeft.vit.prefix import FOLDED_DIR, fold_prefixes  # noqa: E402

from tiny_models import tiny_vit  # noqa: E402

HEAD = 768 * 10 + 10


def _images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _method(model: nn.Module, name: str = "default"):
    return get_state(model).adapters[name].method


def _trained(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    return _method(model, name).trained_tensors(model)


def _perturb(model: nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in _trained(model).values():
            t.add_(scale * torch.randn(t.shape, generator=g, dtype=t.dtype))


def _tokens(seed: int = 2, n: int = 5, dim: int = 64, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(2, n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (after q_norm), k (before k_norm) and v of the tokens, (B, H, N, d)."""
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), k, v


def _split(attn: nn.Module, t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], attn.num_heads, attn.head_dim).transpose(0, 1)


def _finish(attn: nn.Module, heads: torch.Tensor) -> torch.Tensor:
    b, h, n, d = heads.shape
    return attn.proj(attn.norm(heads.transpose(1, 2).reshape(b, n, h * d)))


@pytest.fixture(scope="module")
def vit_base() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)


# ------------------------------------------------------------------------------------------ prefix


def _prefix_vit(qk_norm: bool = False, num_tokens: int = 3, zeros: bool = False, **kw) -> nn.Module:
    model = vp.attach(tiny_vit(0, qk_norm=qk_norm).double(), "prefix", num_tokens=num_tokens, **kw).eval()
    with torch.no_grad():
        for t in _trained(model).values():
            t.zero_() if zeros else t.normal_(generator=torch.Generator().manual_seed(4))
    return model


def _mixture(attn: nn.Module, x: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """Reference §5.10: (1 - lambda) Attn(q, K, V) + lambda Attn(q, P_k, P_v), per head and query."""
    q, k, v = _heads(attn, x)
    k, pk = attn.k_norm(k), attn.k_norm(_split(attn, pk))
    pv = _split(attn, pv)
    s_tok = (q @ k.transpose(-2, -1)) * attn.scale
    if bias is not None:
        s_tok = s_tok + bias
    s_pre = (q @ pk.transpose(-2, -1)) * attn.scale
    mass_tok, mass_pre = s_tok.exp().sum(-1, keepdim=True), s_pre.exp().sum(-1, keepdim=True)
    lam = mass_pre / (mass_pre + mass_tok)
    heads = (1 - lam) * (s_tok.softmax(-1) @ v) + lam * (s_pre.softmax(-1) @ pv)
    return _finish(attn, heads)


MASKS = ["none", "bool", "causal"]


def _mask(kind: str, n: int) -> tuple[dict, torch.Tensor | None]:
    """Keyword arguments of the attention and the additive bias they mean over the token keys."""
    if kind == "none":
        return {}, None
    if kind == "causal":
        return {"is_causal": True}, torch.full((n, n), -math.inf, dtype=torch.float64).triu(1)
    keep = torch.rand(2, 1, n, n, generator=torch.Generator().manual_seed(8)) > 0.3
    keep |= torch.eye(n, dtype=torch.bool)  # every query keeps at least itself
    bias = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, -math.inf)
    return {"attn_mask": keep}, bias


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("zeros", [False, True])
def test_prefix_attention_is_the_gated_mixture_of_token_and_prefix_attention(zeros, qk_norm, mask, fused):
    model = _prefix_vit(qk_norm=qk_norm, zeros=zeros)
    wrapper = model.blocks[0].attn
    assert isinstance(wrapper, ExtendedAttention)
    wrapper.base.fused_attn = fused
    x = _tokens()
    kwargs, bias = _mask(mask, x.shape[1])
    pk, pv = wrapper.prefixes["default"]()
    with torch.no_grad():
        out = wrapper(x, **kwargs)
        expected = _mixture(wrapper.base, x, pk, pv, bias)
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)


def test_prefix_is_not_the_identity_even_with_zero_prefixes():
    x = _images().double()
    base = tiny_vit(0).double().eval()
    model = _prefix_vit(zeros=True)
    with torch.no_grad():
        before, after = base(x), model(x)
        # Zero keys give every prefix weight exp(0) = 1, zero values add nothing: only the token part shrinks.
        attn, tokens = base.blocks[0].attn, _tokens()
        q, k, v = _heads(attn, tokens)
        s = (q @ k.transpose(-2, -1)) * attn.scale
        lam = 3 / (3 + s.exp().sum(-1, keepdim=True))
        shrunk = _finish(attn, (1 - lam) * (s.softmax(-1) @ v))
        assert torch.allclose(model.blocks[0].attn(tokens), shrunk, atol=1e-6, rtol=0)
    assert not torch.allclose(before, after, atol=1e-4)
    assert not _method(model).starts_as_identity


def test_prefix_keeps_the_sequence_length_and_strips_nothing():
    model = _prefix_vit()
    x = _images().double()
    with torch.no_grad():
        tokens = model.forward_features(x)
    assert tokens.shape == tiny_vit(0).double().forward_features(x).shape


def test_prefix_reaches_the_attention_under_a_houlsby_adapter_and_detaches_cleanly():
    for order in (("adapter", "prefix"), ("prefix", "adapter")):
        base = tiny_vit(0)
        reference = copy.deepcopy(base.state_dict())
        model = vp.attach(base, order[0])
        model = vp.attach(model, order[1], name="second")
        inner = [m for m in model.modules() if isinstance(m, ExtendedAttention)]
        assert len(inner) == 2 and all(type(m.base) is Attention for m in inner)
        model(_images()).sum().backward()
        assert all(t.grad is not None for t in _trained(model, "second").values())
        restored = vp.detach(model)
        assert set(restored.state_dict()) == set(reference)
        assert not any(isinstance(m, ExtendedAttention) for m in restored.modules())


def test_prefix_and_gated_prompts_share_one_wrapper_and_leave_with_the_last():
    model = vp.attach(tiny_vit(0), "prefix")
    model = vp.attach(model, "gated_prompt", name="gated")
    wrapper = model.blocks[1].attn
    assert set(wrapper.prefixes) == {"default"} and set(wrapper.branches) == {"gated"}
    vp.detach(model, "gated")
    assert model.blocks[1].attn is wrapper and not wrapper.branches
    vp.detach(model)
    assert type(model.blocks[1].attn) is Attention


def test_two_prefix_adapters_attend_over_both_prefixes():
    model = _prefix_vit(num_tokens=2)
    model = vp.attach(model, "prefix", name="b", num_tokens=3)
    _perturb(model, seed=5)
    wrapper = model.blocks[0].attn
    (ka, va), (kb, vb) = wrapper.prefixes["default"](), wrapper.prefixes["b"]()
    x = _tokens()
    with torch.no_grad():
        expected = _mixture(wrapper.base, x, torch.cat([ka, kb]), torch.cat([va, vb]), None)
        assert torch.allclose(wrapper(x), expected, atol=1e-6, rtol=0)


def test_reparametrised_prefixes_fold_into_flat_ones_that_save_and_load(tmp_path):
    model = vp.attach(tiny_vit(0), "prefix", reparam=True, reparam_hidden=16).eval()
    _perturb(model)
    assert {k for k in _trained(model) if k.startswith("prefix.")} == {
        "prefix.embedding.weight", "prefix.down.weight", "prefix.down.bias", "prefix.up.weight", "prefix.up.bias"}
    x = _images()
    with torch.no_grad():
        expected = model(x)
    vp.save(model, tmp_path / "mlp")
    with torch.no_grad():
        assert torch.equal(vp.load(tiny_vit(0), tmp_path / "mlp").eval()(x), expected)
    fold_prefixes(model)
    assert _method(model).config.reparam is False
    assert {k for k in _trained(model) if k.startswith("prefix.")} == {"prefix.prefixes"}
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    vp.save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["config"]["reparam"] is False
    loaded = vp.load(tiny_vit(0), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_the_run_export_writes_the_folded_adapter_only_for_reparam(tmp_path):
    model = vp.attach(tiny_vit(0), "prefix", reparam=True, reparam_hidden=16).eval()
    _perturb(model)
    x = _images()
    with torch.no_grad():
        expected = model(x)
    _method(model).export(model, tmp_path, RunInfo())
    assert _method(model).config.reparam is True, "exporting must not change the trained adapter"
    loaded = vp.load(tiny_vit(0), tmp_path / FOLDED_DIR).eval()
    assert _method(loaded).config.reparam is False
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    flat = vp.attach(tiny_vit(0), "prefix")
    _method(flat).export(flat, tmp_path / "flat", RunInfo())
    assert not (tmp_path / "flat").exists()


def test_prefix_parameter_counts_on_vit_base(vit_base):
    for kwargs, count in (({}, 184_320), ({"reparam": True}, 9_857_024)):
        model = vp.attach(vit_base, "prefix", **kwargs)
        try:
            assert sum(t.numel() for k, t in _trained(model).items() if k.startswith("prefix.")) == count
            assert vp.summary(model)["trainable"] == count + HEAD
        finally:
            vp.detach(model)
    assert 12 * 2 * 10 * 768 == 184_320
    assert 10 * 768 + (768 * 512 + 512) + (512 * 12 * 2 * 768 + 12 * 2 * 768) == 9_857_024


# ------------------------------------------------------------------------------------ gated prompts


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("overrides", [{}, {"reg_tokens": 2, "class_token": False, "global_pool": "avg"},
                                       {"qk_norm": True}])
def test_gated_prompts_are_exactly_the_base_model_at_attach(overrides, fused):
    x = _images()
    base = tiny_vit(0, **overrides).eval()
    model = vp.attach(tiny_vit(0, **overrides), "gated_prompt").eval()
    for m in list(base.modules()) + list(model.modules()):
        if isinstance(m, Attention):
            m.fused_attn = fused
    assert torch.count_nonzero(_trained(model)["gated_prompt.prompts"]) > 0  # any prompt values
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
        mask = torch.rand(2, 1, 17, 17, generator=torch.Generator().manual_seed(3)) > 0.5
        mask |= torch.eye(17, dtype=torch.bool)
        if not overrides:
            assert torch.equal(model.forward_features(x, attn_mask=mask), base.forward_features(x, attn_mask=mask))


def test_gated_prompt_branch_is_a_separate_softmax_scaled_per_head():
    model = vp.attach(tiny_vit(0, qk_norm=True).double(), "gated_prompt").eval()
    _perturb(model)
    wrapper, module = model.blocks[1].attn, model.gated_prompts["default"]
    attn, x = wrapper.base, _tokens()
    with torch.no_grad():
        q, k, v = _heads(attn, x)
        tokens = ((q @ attn.k_norm(k).transpose(-2, -1)) * attn.scale).softmax(-1) @ v
        kv = attn.qkv(module.prompts[1])  # bias included
        pk, pv = attn.k_norm(_split(attn, kv[:, 64:128])), _split(attn, kv[:, 128:])
        prompt = ((q @ pk.transpose(-2, -1)) * attn.scale).softmax(-1) @ pv
        expected = _finish(attn, tokens + module.gates[1].view(1, -1, 1, 1) * prompt)
        assert torch.allclose(wrapper(x), expected, atol=1e-6, rtol=0)
        # One gate per head: the expected value above mixes every head with its own gate.
        assert module.gates.shape == (2, attn.num_heads) and len(set(module.gates[1].tolist())) == attn.num_heads


def test_the_gate_learns_at_step_one_and_the_prompts_once_it_is_nonzero():
    model = vp.attach(tiny_vit(0), "gated_prompt").eval()
    module = model.gated_prompts["default"]
    optimizer = torch.optim.SGD([module.prompts, module.gates], lr=0.5)
    model(_images()).square().mean().backward()
    assert module.gates.grad.abs().sum() > 0
    assert torch.count_nonzero(module.prompts.grad) == 0, "the zero gate must block the prompts' gradient"
    optimizer.step()
    optimizer.zero_grad()
    assert torch.count_nonzero(module.gates) > 0
    model(_images()).square().mean().backward()
    assert module.prompts.grad.abs().sum() > 0


def test_gated_prompts_go_in_the_top_layers_only():
    model = vp.attach(tiny_vit(0), "gated_prompt", layers=1)
    assert type(model.blocks[0].attn) is Attention
    assert isinstance(model.blocks[1].attn, ExtendedAttention)
    assert model.gated_prompts["default"].prompts.shape == (1, 10, 64)
    with pytest.raises(ConfigError, match="method.layers"):
        vp.attach(tiny_vit(0), "gated_prompt", layers=3)


def test_gated_prompt_parameter_counts_on_vit_base(vit_base):
    for kwargs, count in (({}, 12 * 10 * 768 + 12 * 12), ({"layers": 4, "num_tokens": 5}, 4 * 5 * 768 + 4 * 12)):
        model = vp.attach(vit_base, "gated_prompt", **kwargs)
        try:
            module = model.gated_prompts["default"]
            assert isinstance(module, GatedPrompts)
            assert sum(t.numel() for k, t in _trained(model).items() if k.startswith("gated_prompt.")) == count
            assert vp.summary(model)["trainable"] == count + HEAD
        finally:
            vp.detach(model)
    assert 12 * 10 * 768 + 12 * 12 == 92_304
