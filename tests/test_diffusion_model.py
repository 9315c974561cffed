"""The Stable Diffusion container: prompt encoding, forward, pipelines, loading, SDXL, half precision."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

import torch
from safetensors.torch import save_file

import visionpeft as vp
from visionpeft.diffusion.models import StableDiffusionModel, load_sd_model
from visionpeft.errors import ConfigError
from visionpeft.hosts import find_host

from tiny_models import save_tiny_sd_pipeline, tiny_sd_components, tiny_sd_pipeline, tiny_sdxl_components


def tiny_sdxl_model(seed: int = 0) -> StableDiffusionModel:
    """A tiny SDXL container (:func:`tiny_models.tiny_sdxl_components`)."""
    c = tiny_sdxl_components(seed)
    return StableDiffusionModel(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"],
                                text_encoder_2=c["text_encoder_2"], tokenizer_2=c["tokenizer_2"])


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"))


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3, 900])


def test_forward_is_the_unet_under_the_text_encoders_last_hidden_state():
    model = StableDiffusionModel.from_pipeline(tiny_sd_pipeline())
    latents, t = _inputs()
    ids = model.tokenize(["a photo of a cat", "a dog"])
    assert set(ids) == {"input_ids"} and ids["input_ids"].shape == (2, 77)
    with torch.no_grad():
        expected = model.unet(latents, t, encoder_hidden_states=model.text_encoder(ids["input_ids"])[0]).sample
        got = model(latents, t, ids["input_ids"])
    assert torch.equal(got, expected)


def test_the_container_freezes_vae_and_text_encoder_and_is_its_own_host():
    model = StableDiffusionModel.from_pipeline(tiny_sd_pipeline())
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert not model.vae.training and not model.text_encoder.training
    assert find_host(model).family == "diffusers.StableDiffusion"
    assert type(model.noise_scheduler).__name__ == "DDPMScheduler"
    assert torch.equal(model.noise_scheduler.alphas_cumprod, model.scheduler.alphas_cumprod)
    assert model.prediction_type == "epsilon" and not model.is_sdxl and model.vae_scale_factor == 2


def test_to_pipeline_shares_the_modules_and_generates():
    model = vp.attach(StableDiffusionModel.from_pipeline(tiny_sd_pipeline()), "lora", r=2)
    pipe = model.to_pipeline()
    assert pipe.unet is model.unet and pipe.vae is model.vae and pipe.text_encoder is model.text_encoder
    assert pipe.safety_checker is None
    out = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32)


def test_t2i_adapter_enters_the_unet_through_the_containers_hooks_and_needs_a_condition():
    from visionpeft.diffusion.t2i_adapter import find_t2i_adapter

    model = StableDiffusionModel.from_pipeline(tiny_sd_pipeline())
    latents, t = _inputs()
    ids = model.tokenize(["a", "b"])["input_ids"]
    with torch.no_grad():
        plain = model(latents, t, ids)
    torch.manual_seed(1)
    model = vp.attach(model, "t2i_adapter", in_channels=1, channels=[32, 64], num_res_blocks=1, downscale_factor=2)
    adapter = find_t2i_adapter(model)
    with pytest.raises(ConfigError, match="condition="):
        model(latents, t, ids)
    condition = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = adapter(condition)
        expected = model.unet(latents, t, encoder_hidden_states=model.text_encoder(ids)[0],
                              down_intrablock_additional_residuals=list(features)).sample
        first = model(latents, t, ids, condition=condition)
        second = model(latents, t, ids, condition=condition)  # a fresh residual list each call
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert not torch.equal(first, plain)
    assert type(model.to_pipeline()).__name__ == "StableDiffusionAdapterPipeline"
    model = vp.detach(model)
    with torch.no_grad():
        assert torch.equal(model(latents, t, ids, condition=condition), plain)  # the hooks went with the method
    assert type(model.to_pipeline()).__name__ == "StableDiffusionPipeline"


def test_the_container_passes_what_unet_input_hooks_return_and_takes_one_pipeline_factory():
    model = StableDiffusionModel.from_pipeline(tiny_sd_pipeline())
    latents, t = _inputs()
    ids = model.tokenize(["a", "b"])["input_ids"]
    seen = []

    def residual(call):
        seen.append((call.condition, call.dtype, tuple(call.encoder_hidden_states.shape)))
        return {"down_intrablock_additional_residuals": [torch.ones(2, 32, 16, 16), torch.ones(2, 64, 8, 8)]}

    with torch.no_grad():
        plain = model(latents, t, ids)
        handle = model.register_unet_inputs(residual)
        shifted = model(latents, t, ids, condition="marker")
        expected = model.unet(latents, t, encoder_hidden_states=model.text_encoder(ids)[0],
                              down_intrablock_additional_residuals=[torch.ones(2, 32, 16, 16),
                                                                    torch.ones(2, 64, 8, 8)]).sample
        handle.remove()
        again = model(latents, t, ids)
    assert torch.equal(shifted, expected) and not torch.equal(shifted, plain) and torch.equal(again, plain)
    assert seen == [("marker", model.unet.dtype, (2, 77, 32))]
    from diffusers import StableDiffusionPipeline

    built = []

    class Marked(StableDiffusionPipeline):
        pass

    def factory(parts, sdxl):
        built.append((sorted(parts), sdxl))
        return Marked(image_encoder=None, **parts)

    handle = model.register_pipeline(factory)
    with pytest.raises(ConfigError, match="already chose this model's pipeline"):
        model.register_pipeline(factory)
    pipe = model.to_pipeline()
    assert type(pipe) is Marked and pipe.unet is model.unet and pipe.safety_checker is None
    assert built[0][1] is False and {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(built[0][0])
    handle.remove()
    assert type(model.to_pipeline()).__name__ == "StableDiffusionPipeline"


def test_load_sd_model_reads_a_diffusers_folder(saved_pipeline):
    model = load_sd_model(saved_pipeline)
    reference = StableDiffusionModel.from_pipeline(tiny_sd_pipeline())
    assert list(model.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.tokenize("a photo of a cat")["input_ids"].tolist() == reference.tokenize("a photo of a cat")[
        "input_ids"].tolist()
    half = load_sd_model(saved_pipeline, torch_dtype="bfloat16")
    assert half.unet.dtype == torch.bfloat16


def test_load_sd_model_errors(tmp_path, saved_pipeline):
    with pytest.raises(ConfigError, match="does not exist"):
        load_sd_model(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="no model_index.json"):
        load_sd_model(tmp_path)
    with pytest.raises(ConfigError, match="neither a folder"):
        load_sd_model("nope")
    with pytest.raises(ConfigError, match="not found in the local Hugging Face cache"):
        load_sd_model("nobody/not-a-cached-model")
    with pytest.raises(ConfigError, match="is not a dtype"):
        load_sd_model(saved_pipeline, torch_dtype="float8")
    # A .safetensors that is not a Stable Diffusion checkpoint: single-file loading fails with the path.
    # (diffusers converts only original-layout (LDM) checkpoints, and offline it also needs a local
    # config; no diffusers -> LDM writer exists in the library to build a tiny one, so only this path is tested.)
    bogus = tmp_path / "bogus.safetensors"
    save_file({"weight": torch.zeros(2)}, bogus)
    with pytest.raises(ConfigError, match="could not be read as a Stable Diffusion checkpoint"):
        load_sd_model(bogus, config=str(saved_pipeline))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ConfigError, match="not a checkpoint file"):
        load_sd_model(text, single_file=True)


def test_sdxl_encode_prompt_and_forward_follow_the_sdxl_pipeline():
    model = tiny_sdxl_model()
    assert model.is_sdxl
    ids = model.tokenize(["a photo of a cat", "a dog"])
    assert set(ids) == {"input_ids", "input_ids_2"}
    with torch.no_grad():
        hidden, pooled = model.encode_prompt(ids["input_ids"], ids["input_ids_2"])
        one = model.text_encoder(ids["input_ids"], output_hidden_states=True)
        two = model.text_encoder_2(ids["input_ids_2"], output_hidden_states=True)
        assert torch.equal(hidden, torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1))
        assert torch.equal(pooled, two.text_embeds)
        # The pipeline's own encode_prompt gives the same states.
        pipe = model.to_pipeline()
        embeds, _, pooled_pipe, _ = pipe.encode_prompt(["a photo of a cat", "a dog"], do_classifier_free_guidance=False)
        assert torch.equal(embeds, hidden) and torch.equal(pooled_pipe, pooled)
        latents, t = _inputs()
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)
        expected = model.unet(latents, t, encoder_hidden_states=hidden,
                              added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert torch.equal(model(latents, t, ids["input_ids"], ids["input_ids_2"]), expected)
    out = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert out.shape == (1, 3, 32, 32)


def test_half_precision_weights_train_fp32_lora_tensors(saved_pipeline):
    from visionpeft.diffusion.loss import diffusion_loss
    from visionpeft.optim import trainables_to_fp32

    model = vp.attach(load_sd_model(saved_pipeline, torch_dtype=torch.bfloat16), "lora", r=2,
                      targets=["@unet_attn", "@text_encoder"])
    trainables_to_fp32(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert model.unet.conv_in.weight.dtype == torch.bfloat16
    assert model.vae.encoder.conv_in.weight.dtype == torch.bfloat16
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, **model.tokenize(["a cat", "a dog"]),
             "is_class": torch.tensor([False, False])}
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)


@pytest.mark.gpu
def test_fp16_mixed_precision_lora_step_on_gpu(saved_pipeline):
    """fp16 frozen weights, fp32 LoRA, GradScaler: no "Attempting to unscale FP16 gradients"."""
    from visionpeft.diffusion.loss import diffusion_loss
    from visionpeft.optim import trainables_to_fp32

    model = vp.attach(load_sd_model(saved_pipeline, torch_dtype=torch.float16), "lora", r=2).cuda()
    trainables_to_fp32(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    batch = {"pixel_values": (torch.rand(2, 3, 32, 32) * 2 - 1).cuda(),
             **{k: v.cuda() for k, v in model.tokenize(["a cat", "a dog"]).items()}}
    before = [p.detach().clone() for p in trained]
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = diffusion_loss(model, batch)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, trained, strict=True))


@pytest.mark.parametrize("force_upcast", [True, False])
def test_a_float16_vae_with_force_upcast_encodes_in_float32(force_upcast):
    from diffusers import AutoencoderKL

    from visionpeft.diffusion.models import vae_posterior

    fp32 = tiny_sd_components()["vae"].half().float()  # weights float16 holds exactly, so both VAEs agree
    fp16 = AutoencoderKL.from_config(fp32.config, force_upcast=force_upcast).half()
    fp16.load_state_dict(fp32.state_dict())
    seen = []
    fp16.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    model = StableDiffusionModel.from_pipeline(tiny_sd_pipeline())
    model.vae = fp16
    with torch.no_grad():
        expected = fp32.encode(pixels).latent_dist.parameters
        posterior = vae_posterior(fp16, pixels)
        latents = model.encode_images(pixels, generator=torch.Generator().manual_seed(0))
    assert fp16.dtype == torch.float16  # cast back after the encode
    if force_upcast:
        assert seen == [torch.float32, torch.float32]
        assert posterior.parameters.dtype == torch.float32
        torch.testing.assert_close(posterior.parameters, expected, rtol=1e-5, atol=1e-5)
        sample = torch.randn(expected[:, :4].shape, generator=torch.Generator().manual_seed(0))
        mean, logvar = expected.chunk(2, dim=1)
        torch.testing.assert_close(latents, (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * sample)
                                   * fp16.config.scaling_factor, rtol=1e-5, atol=1e-5)
    else:
        assert seen == [torch.float16, torch.float16] and posterior.parameters.dtype == torch.float16


def test_two_methods_setting_the_same_unet_argument_is_an_error_and_a_refused_attach_changes_nothing():
    model = StableDiffusionModel.from_pipeline(tiny_sd_pipeline())
    latents, t = _inputs()
    ids = model.tokenize(["a", "b"])["input_ids"]
    first = model.register_unet_inputs(lambda call: {"down_intrablock_additional_residuals": []})
    second = model.register_unet_inputs(lambda call: {"down_intrablock_additional_residuals": []})
    with pytest.raises(ConfigError, match=r"both set the UNet's \['down_intrablock_additional_residuals'\]"):
        model(latents, t, ids)
    first.remove(), second.remove()
    taken = model.register_pipeline(lambda parts, sdxl: None)
    modules, hooks = set(model._modules), dict(model._unet_input_hooks)
    with pytest.raises(ConfigError, match="already chose this model's pipeline"):
        vp.attach(model, "t2i_adapter", in_channels=1, channels=[32, 64], num_res_blocks=1, downscale_factor=2)
    assert set(model._modules) == modules and model._unet_input_hooks == hooks  # nothing half-attached
    taken.remove()
