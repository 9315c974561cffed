"""T2I-Adapter on the tiny Stable Diffusion pipeline: the adapter alone trains, and its export loads in diffusers."""

from __future__ import annotations

import copy

import pytest
import torch

import visionpeft as vp
from visionpeft.errors import AdapterError, ConfigError, DataError
from visionpeft.method import get_state

pytest.importorskip("diffusers")

import itertools

from diffusers import StableDiffusionAdapterPipeline, T2IAdapter, UNet2DConditionModel

from visionpeft.diffusion.loss import diffusion_loss
from visionpeft.diffusion.models import StableDiffusionModel
from visionpeft.diffusion.t2i_adapter import (
    adapter_feature_shapes,
    export_adapter,
    find_t2i_adapter,
    unet_residual_slots,
)

from tiny_models import tiny_sd_components, tiny_sd_pipeline


def _model(seed: int = 0) -> StableDiffusionModel:
    return StableDiffusionModel.from_pipeline(tiny_sd_pipeline(seed))


def _condition(batch: int = 2, channels: int = 3, size: int = 32, seed: int = 4) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _batch(model: StableDiffusionModel, channels: int = 3, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(11)
    return {
        "pixel_values": torch.rand(2, 3, size, size, generator=g) * 2 - 1,
        "condition": _condition(2, channels, size),
        **model.tokenize(["a photo of a cat", "a photo of a dog"]),
    }


def _loss(model, batch) -> torch.Tensor:
    torch.manual_seed(5)  # the same noise, timesteps and VAE sample every call: a fixed batch
    return diffusion_loss(model, batch)


def _inputs(model, batch: int = 2, size: int = 32):
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(batch, 4, size // model.vae_scale_factor, size // model.vae_scale_factor, generator=g)
    ids = model.tokenize(["a photo of a cat"] * batch)["input_ids"]
    return latents, torch.tensor([10, 700][:batch]), ids


# --- attach -------------------------------------------------------------------------------------


def test_attach_fits_the_unet_and_only_the_adapter_trains():
    model = vp.attach(_model(), "t2i_adapter")
    adapter = model.t2i_adapter
    assert isinstance(adapter, T2IAdapter)
    keys = ("in_channels", "channels", "num_res_blocks", "downscale_factor", "adapter_type")
    assert {k: adapter.config[k] for k in keys} == {
        "in_channels": 3, "channels": [32, 64], "num_res_blocks": 2, "downscale_factor": 2,
        "adapter_type": "full_adapter",
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"t2i_adapter.{n}" for n, _ in adapter.named_parameters()}
    assert vp.summary(model)["trainable"] == sum(p.numel() for p in adapter.parameters())
    for part in (model.unet, model.vae, model.text_encoder):
        assert not any(p.requires_grad for p in part.parameters())


def test_gradients_reach_the_adapter_only():
    model = vp.attach(_model(), "t2i_adapter")
    _loss(model, _batch(model)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"t2i_adapter.{n}" for n, _ in model.t2i_adapter.named_parameters()}
    assert all(p.grad.abs().sum() > 0 for p in model.t2i_adapter.parameters())


def test_residuals_enter_the_unet_as_down_intrablock_residuals():
    model = vp.attach(_model(), "t2i_adapter").eval()
    latents, t, ids = _inputs(model)
    condition = _condition()
    with torch.no_grad():
        features = model.t2i_adapter(condition)
        assert [tuple(f.shape) for f in features] == [(2, 32, 16, 16), (2, 64, 8, 8)]
        hidden = model.text_encoder(ids)[0]
        expected = model.unet(latents, t, hidden, down_intrablock_additional_residuals=list(features)).sample
        plain = model.unet(latents, t, hidden).sample
        got = model(latents, t, ids, condition=condition)
        # The model's forward hands the UNet a fresh list every call: a second call is the same.
        again = model(latents, t, ids, condition=condition)
    assert torch.equal(got, expected) and torch.equal(again, expected)
    assert not torch.equal(got, plain)


def test_conditioning_scale_multiplies_the_features():
    model = vp.attach(_model(), "t2i_adapter", adapter_conditioning_scale=0.5).eval()
    latents, t, ids = _inputs(model)
    condition = _condition()
    with torch.no_grad():
        scaled = model.t2i_adapter(condition)
        handle_free = copy.deepcopy(model.t2i_adapter)
        handle_free._forward_hooks.clear()
        raw = handle_free(condition)
        assert all(torch.equal(s, 0.5 * r) for s, r in zip(scaled, raw, strict=True))
        hidden = model.text_encoder(ids)[0]
        expected = model.unet(latents, t, hidden, down_intrablock_additional_residuals=[0.5 * r for r in raw]).sample
        assert torch.equal(model(latents, t, ids, condition=condition), expected)


def test_training_lowers_the_loss_and_leaves_the_unet_unchanged():
    model = vp.attach(_model(), "t2i_adapter")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = _batch(model)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    losses.append(_loss(model, batch).item())
    assert all(after < before for before, after in itertools.pairwise(losses)), losses
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_detach_removes_the_adapter_exactly():
    model = _model()
    reference = copy.deepcopy(model.state_dict())
    modules = set(model._modules)
    model = vp.attach(model, "t2i_adapter")
    restored = vp.detach(model)
    assert find_t2i_adapter(restored) is None and set(restored._modules) == modules
    state = restored.state_dict()
    assert list(state) == list(reference) and all(torch.equal(state[k], v) for k, v in reference.items())
    assert all(p.grad is None for p in restored.parameters())
    # ... and the plain model runs without a condition again.
    latents, t, ids = _inputs(restored)
    restored(latents, t, ids)


# --- the architecture check ---------------------------------------------------------------------


def test_feature_shapes_are_diffusers_own():
    # SD 1.5's adapter (channels 320..1280, factor 8) on SD 1.5's UNet layout; measured, not assumed.
    sd15 = {"in_channels": 3, "channels": [320, 640, 1280, 1280], "num_res_blocks": 2, "downscale_factor": 8,
            "adapter_type": "full_adapter"}
    assert adapter_feature_shapes(sd15) == [(320, 8), (640, 16), (1280, 32), (1280, 64)]
    xl = {**sd15, "downscale_factor": 16, "adapter_type": "full_adapter_xl"}
    assert adapter_feature_shapes(xl) == [(320, 16), (640, 16), (1280, 32), (1280, 32)]
    light = {**sd15, "channels": [320, 640, 1280], "num_res_blocks": 4, "adapter_type": "light_adapter"}
    assert adapter_feature_shapes(light) == [(320, 8), (640, 16), (1280, 32), (1280, 64)]
    with torch.device("meta"):
        unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280))
    assert unet_residual_slots(unet, 8)[:4] == adapter_feature_shapes(sd15)


def _three_level(down_block_types, up_block_types, cross_attention_dim: int = 32, **extra) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=down_block_types, up_block_types=up_block_types,
                                cross_attention_dim=cross_attention_dim, **extra)


def test_light_adapter_on_a_three_level_unet_matches_the_pipeline():
    c = tiny_sd_components()
    c["unet"] = _three_level(("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                             ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    model = StableDiffusionModel(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"])
    model = vp.attach(model, "t2i_adapter", adapter_type="light_adapter", in_channels=1).eval()
    assert model.t2i_adapter.config.channels == [32, 64]
    latents, t, ids = _inputs(model)
    out = model(latents, t, ids, condition=_condition(channels=1))
    assert out.shape == latents.shape


def test_full_adapter_xl_on_a_tiny_sdxl():
    from tiny_models import tiny_sdxl_components

    c = tiny_sdxl_components()
    c["unet"] = _three_level(
        ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, cross_attention_dim=64,
    )
    model = StableDiffusionModel(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"],
                                 text_encoder_2=c["text_encoder_2"], tokenizer_2=c["tokenizer_2"])
    model = vp.attach(model, "t2i_adapter", adapter_type="full_adapter_xl").eval()
    # SDXL's layout: no residual before the first downsampler, the fourth feature enters the mid block.
    assert model.t2i_adapter.config.channels == [32, 64, 64, 64]
    assert model.t2i_adapter.config.downscale_factor == 4
    latents, t, _ = _inputs(model)
    ids = model.tokenize(["a photo of a cat"] * 2)
    condition = _condition()
    with torch.no_grad():
        out = model(latents, t, ids["input_ids"], ids["input_ids_2"], condition=condition)
        plain = model(latents, t, ids["input_ids"], ids["input_ids_2"], condition=0 * condition)
    assert out.shape == latents.shape and not torch.equal(out, plain)


def test_bad_configs_fail_at_attach():
    model = _model()
    with pytest.raises(ConfigError, match="but this UNet takes residuals"):
        vp.attach(model, "t2i_adapter", adapter_type="full_adapter_xl")
    with pytest.raises(ConfigError, match="but this UNet takes residuals"):
        vp.attach(model, "t2i_adapter", channels=[32, 32])
    with pytest.raises(ConfigError, match="but this UNet takes residuals"):
        vp.attach(model, "t2i_adapter", downscale_factor=8)
    with pytest.raises(ConfigError, match="but this UNet takes residuals"):
        vp.attach(model, "t2i_adapter", channels=[32, 64, 64, 64])
    with pytest.raises(ConfigError, match="in_channels"):
        vp.config("t2i_adapter", in_channels=0)
    with pytest.raises(ConfigError, match="adapter_type"):
        vp.config("t2i_adapter", adapter_type="style")
    assert get_state(model) is None and find_t2i_adapter(model) is None


def test_bad_conditions_are_data_errors():
    model = vp.attach(_model(), "t2i_adapter", in_channels=1)
    latents, t, ids = _inputs(model)
    with pytest.raises(DataError, match="3 channels but this T2I-Adapter takes in_channels=1"):
        model(latents, t, ids, condition=_condition(channels=3))
    with pytest.raises(DataError, match="not divisible by the T2I-Adapter's downscale_factor 2"):
        model(latents, t, ids, condition=_condition(channels=1, size=33))
    with pytest.raises(DataError, match=r"\(B, C, H, W\)"):
        model(latents, t, ids, condition=_condition(channels=1)[0])
    with pytest.raises(ConfigError, match="condition="):
        model(latents, t, ids)


def test_one_adapter_per_model():
    model = vp.attach(_model(), "t2i_adapter")
    with pytest.raises(AdapterError, match="already attached"):
        vp.attach(model, "t2i_adapter", name="second")


# --- export -------------------------------------------------------------------------------------


def _trained() -> StableDiffusionModel:
    model = vp.attach(_model(), "t2i_adapter", in_channels=1)
    with torch.no_grad():  # move the weights away from their init, as training does
        g = torch.Generator().manual_seed(3)
        for p in model.t2i_adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_export_reloads_in_the_adapter_pipeline(tmp_path):
    from PIL import Image

    model = _trained()
    folder = export_adapter(model, tmp_path)
    assert folder == tmp_path / "t2i_adapter"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = T2IAdapter.from_pretrained(folder)
    condition = _condition(channels=1)
    with torch.no_grad():
        for mine, theirs in zip(model.t2i_adapter(condition), loaded(condition), strict=True):
            assert torch.equal(mine, theirs)

    c = tiny_sd_components()
    pipe = StableDiffusionAdapterPipeline(**c, adapter=loaded, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    edges = Image.new("L", (32, 32))
    edges.paste(255, (8, 8, 24, 24))
    kwargs = dict(image=edges, num_inference_steps=2, height=32, width=32, output_type="np")
    images = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert images.shape == (1, 32, 32, 3)
    # The model's own adapter pipeline (shared modules) generates the same image.
    ours = model.to_pipeline()("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (ours == images).all()
    # Exporting again replaces the folder whole.
    export_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t2i_adapter"]


def test_export_needs_an_adapter(tmp_path):
    with pytest.raises(AdapterError, match="no t2i_adapter"):
        export_adapter(_model(), tmp_path)
