"""The diffusion task: loss math, data readers, config checks, sampling, and the examples end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import numpy as np
import torch
from PIL import Image

from visionpeft.diffusion import data as sd_data
from visionpeft.diffusion.conditions import extract
from visionpeft.diffusion.loss import combine, diffusion_loss, snr_weights, target_for
from visionpeft.diffusion.models import StableDiffusionModel
from visionpeft.diffusion.sampling import save_samples
from visionpeft.errors import ConfigError, DataError
from visionpeft.runconfig import load_run_config

from tiny_models import save_tiny_sd_pipeline, tiny_sd_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _image(path: Path, size=(40, 48), mode="RGB", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path)
    return path


@pytest.fixture(scope="module")
def sd_model() -> StableDiffusionModel:
    return StableDiffusionModel.from_pipeline(tiny_sd_pipeline())


# --- loss -----------------------------------------------------------------------------------------


def test_targets_and_min_snr_weights_match_the_formulas(sd_model):
    scheduler = sd_model.noise_scheduler
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 400, 999])
    a = scheduler.alphas_cumprod[t].double()
    assert torch.equal(target_for(scheduler, latents, noise, t, "epsilon"), noise)
    velocity = a.sqrt().view(3, 1, 1, 1) * noise.double() - (1 - a).sqrt().view(3, 1, 1, 1) * latents.double()
    assert torch.allclose(target_for(scheduler, latents, noise, t, "v_prediction").double(), velocity, atol=1e-6)
    snr = a / (1 - a)
    gamma = 5.0
    eps = snr_weights(scheduler, t, gamma, "epsilon").double()
    v = snr_weights(scheduler, t, gamma, "v_prediction").double()
    assert torch.allclose(eps, torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr, rtol=1e-5)
    assert torch.allclose(v, torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / (snr + 1), rtol=1e-5)
    assert eps[0] < 1 and eps[2] == pytest.approx(1.0)  # t=0 has a huge SNR: clipped; t=999 a tiny one: kept
    with pytest.raises(ConfigError, match="prediction_type 'sample'"):
        target_for(scheduler, latents, noise, t, "sample")


def test_min_snr_weights_of_a_zero_terminal_snr_step_are_finite():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    t = torch.tensor([0, 500, 999])
    assert scheduler.alphas_cumprod[999] == 0  # the last step is pure noise: SNR 0
    eps = snr_weights(scheduler, t, 5.0, "epsilon")
    v = snr_weights(scheduler, t, 5.0, "v_prediction")
    assert torch.isfinite(eps).all() and torch.isfinite(v).all()
    assert eps[2] == 1.0 and eps[1] == 1.0 and eps[0] < 1  # min(snr, gamma) / snr, and its limit 1 at snr 0
    assert v[2] == 0.0


def test_prior_preservation_adds_the_weighted_class_half():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 5.0])
    is_class = torch.tensor([False, False, True, True])
    assert combine(per_sample, is_class, None, 0.5).item() == pytest.approx(1.5 + 0.5 * 4.0)
    weights = torch.tensor([0.5, 1.0, 9.0, 9.0])  # min-SNR weighs the instance rows only
    assert combine(per_sample, is_class, weights, 1.0).item() == pytest.approx((0.5 + 2.0) / 2 + 4.0)
    assert combine(per_sample, torch.zeros(4, dtype=torch.bool), None, 1.0).item() == pytest.approx(2.75)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_is_the_hand_computed_loss(sd_model, prediction_type):
    from diffusers import DDPMScheduler

    model = copy.copy(sd_model)
    model.noise_scheduler = DDPMScheduler.from_config(sd_model.noise_scheduler.config, prediction_type=prediction_type)
    batch = {"pixel_values": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1,
             **model.tokenize(["a cat", "a dog"]), "is_class": torch.tensor([False, True])}
    torch.manual_seed(7)
    got = diffusion_loss(model, batch, snr_gamma=5.0, noise_offset=0.1, prior_loss_weight=0.7)
    torch.manual_seed(7)
    with torch.no_grad():
        latents = model.vae.encode(batch["pixel_values"]).latent_dist.sample() * model.vae.config.scaling_factor
        noise = torch.randn_like(latents) + 0.1 * torch.randn(2, 4, 1, 1)
        t = torch.randint(0, 1000, (2,))
        noisy = model.noise_scheduler.add_noise(latents, noise, t)
        pred = model.unet(noisy, t, encoder_hidden_states=model.text_encoder(batch["input_ids"])[0]).sample
    a = model.noise_scheduler.alphas_cumprod[t]
    snr = a / (1 - a)
    if prediction_type == "epsilon":
        target, w = noise, torch.minimum(snr, torch.tensor(5.0)) / snr
    else:
        target = a.sqrt().view(2, 1, 1, 1) * noise - (1 - a).sqrt().view(2, 1, 1, 1) * latents
        w = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    expected = mse[0] * w[0] + 0.7 * mse[1]
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


# --- data -----------------------------------------------------------------------------------------


def test_captions_from_metadata_jsonl_and_txt(tmp_path):
    _image(tmp_path / "a" / "x.png")
    _image(tmp_path / "a" / "sub" / "y.jpg", seed=1)
    lines = [{"file_name": "x.png", "caption": "a red x"}, {"file_name": "sub/y.jpg", "caption": "a y"}]
    (tmp_path / "a" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    records = sd_data.read_records(tmp_path / "a", caption_column="caption")
    assert [(r.path.name, r.caption) for r in records] == [("x.png", "a red x"), ("y.jpg", "a y")]
    with pytest.raises(DataError, match="no caption column 'text'"):
        sd_data.read_records(tmp_path / "a")
    _image(tmp_path / "b" / "p.png")
    (tmp_path / "b" / "p.txt").write_text("a photo of p\n")
    _image(tmp_path / "b" / "q.png")
    with pytest.raises(DataError, match=r"no caption for .*q\.png: q\.txt is missing"):
        sd_data.read_records(tmp_path / "b")
    (tmp_path / "b" / "q.txt").write_text("q")
    assert [r.caption for r in sd_data.read_records(tmp_path / "b")] == ["a photo of p", "q"]
    assert {r.caption for r in sd_data.read_records(tmp_path / "b", instance_prompt="sks")} == {"sks"}


def test_a_corrupt_image_stops_with_its_path_or_is_skipped_and_counted(tmp_path):
    good = _image(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    records = sd_data.read_records(tmp_path, instance_prompt="sks")
    dataset = sd_data.SDImageDataset(records, resolution=32)
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png"):
        dataset[0]
    kept = sd_data.SDImageDataset(records, resolution=32, skip_bad=True)
    assert len(kept) == 1 and kept.skipped == [bad] and kept.records[0].path == good


def test_mixed_image_modes_become_rgb(tmp_path):
    for i, mode in enumerate(["RGB", "L", "RGBA", "P", "CMYK"]):
        _image(tmp_path / f"{i}.png" if mode != "CMYK" else tmp_path / f"{i}.jpg", mode=mode, seed=i)
    dataset = sd_data.SDImageDataset(sd_data.read_records(tmp_path, instance_prompt="x"), resolution=32)
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["pixel_values"].shape == (3, 32, 32)
        assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1


def test_condition_modes(tmp_path):
    gray = Image.new("L", (8, 8), 100)
    assert sd_data.condition_to_mode(gray, 1, "g").mode == "L"
    rgb = sd_data.condition_to_mode(gray, 3, "g")
    assert rgb.mode == "RGB" and np.asarray(rgb)[0, 0].tolist() == [100, 100, 100]
    with pytest.raises(DataError, match=r"c\.png is RGB but the adapter takes 1-channel"):
        sd_data.condition_to_mode(Image.new("RGB", (8, 8)), 1, "c.png")
    with pytest.raises(DataError, match="alpha channel"):
        sd_data.condition_to_mode(Image.new("RGBA", (8, 8)), 3, "c.png")


def test_paired_conditions_get_the_images_crop_and_flip(tmp_path):
    (tmp_path / "cond").mkdir()
    for i in range(3):
        path = _image(tmp_path / "img" / f"{i}.png", size=(48, 40), seed=i)
        Image.open(path).save(tmp_path / "cond" / f"{i}.png")
    records = sd_data.read_records(tmp_path / "img", instance_prompt="x")
    dataset = sd_data.SDImageDataset(records, resolution=32, crop="random", flip=True, condition_root=tmp_path / "cond",
                                     image_root=tmp_path / "img", condition_channels=3, seed=3)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for i in range(3):
            item = dataset[i]
            # The condition is the image itself, so identical geometry gives identical pixels.
            assert torch.allclose(item["condition"] * 2 - 1, item["pixel_values"], atol=1e-6)
    (tmp_path / "cond" / "2.png").unlink()
    with pytest.raises(DataError, match=r"no condition image for .*2\.png"):
        sd_data.SDImageDataset(records, resolution=32, condition_root=tmp_path / "cond", image_root=tmp_path / "img")
    kept = sd_data.SDImageDataset(records, resolution=32, condition_root=tmp_path / "cond",
                                  image_root=tmp_path / "img", skip_bad=True)
    assert len(kept) == 2 and len(kept.skipped) == 1


def test_extracted_conditions_are_single_channel_edges(tmp_path):
    _image(tmp_path / "0.png", size=(32, 32))
    dataset = sd_data.SDImageDataset(sd_data.read_records(tmp_path, instance_prompt="x"), resolution=32,
                                     condition_kind="canny", condition_channels=1)
    condition = dataset[0]["condition"]
    assert condition.shape == (1, 32, 32) and set(condition.unique().tolist()) <= {0.0, 1.0}


def test_extracted_conditions_of_a_large_image_keep_full_strength_edges(tmp_path):
    array = np.zeros((256, 256, 3), dtype=np.uint8)
    array[64:192, 64:192] = 255
    Image.fromarray(array).save(tmp_path / "0.png")
    records = sd_data.read_records(tmp_path, instance_prompt="x")
    canny = sd_data.SDImageDataset(records, resolution=32, condition_kind="canny", condition_channels=1)[0]
    # Edges are extracted at the training size, not shrunk from a 256-pixel edge map.
    assert canny["condition"].shape == (1, 32, 32) and canny["condition"].max().item() == 1.0
    item = sd_data.SDImageDataset(records, resolution=32, condition_kind="sketch", condition_channels=1)[0]
    rgb = ((item["pixel_values"] + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    expected = sd_data.pil_to_tensor(extract(Image.fromarray(rgb), "sketch"))
    assert torch.equal(item["condition"], expected)


def test_a_paired_condition_of_another_size_is_resized_to_the_image_before_the_crop(tmp_path):
    # A 96x64 image of 4x4 blocks and its condition: the same blocks at half size (48x32).
    blocks = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    (tmp_path / "img").mkdir()
    (tmp_path / "cond").mkdir()
    Image.fromarray(blocks.repeat(4, 0).repeat(4, 1)).save(tmp_path / "img" / "0.png")
    Image.fromarray(blocks.repeat(2, 0).repeat(2, 1)).save(tmp_path / "cond" / "0.png")
    records = sd_data.read_records(tmp_path / "img", instance_prompt="x")
    dataset = sd_data.SDImageDataset(records, resolution=32, crop="random", flip=True, condition_root=tmp_path / "cond",
                                     image_root=tmp_path / "img", condition_channels=3, seed=5)
    seen = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        item = dataset[0]
        seen.add(tuple(item["crop_top_left"].tolist()))
        condition, pixels = item["condition"] * 2 - 1, item["pixel_values"]
        assert condition.shape == pixels.shape == (3, 32, 32)
        # Same crop and flip: only the blurred block borders differ; a mirrored condition would not match.
        assert (condition - pixels).abs().mean() < 0.1
        assert (condition.flip(-1) - pixels).abs().mean() > 0.3
    assert len(seen) > 1


def test_a_paired_condition_of_another_aspect_ratio_is_refused_naming_both_files(tmp_path):
    """Stretched, a control would point at other pixels than its image's: only another scale is resized."""
    _image(tmp_path / "img" / "0.png", size=(48, 32))
    _image(tmp_path / "cond" / "0.png", size=(32, 32))
    _image(tmp_path / "img" / "1.png", size=(50, 30), seed=1)
    _image(tmp_path / "cond" / "1.png", size=(17, 10), seed=1)  # a third of the size, rounded
    records = sd_data.read_records(tmp_path / "img", instance_prompt="x")
    options = {"resolution": 16, "condition_root": tmp_path / "cond", "image_root": tmp_path / "img"}
    dataset = sd_data.SDImageDataset(records, **options)
    assert dataset[1]["condition"].shape == (3, 16, 16)
    with pytest.raises(DataError, match=r"condition image .*cond/0\.png is 32x32 but its image .*img/0\.png is 48x32, "
                                        "another aspect ratio"):
        dataset[0]
    kept = sd_data.SDImageDataset(records, skip_bad=True, **options)
    assert [r.path.name for r in kept.records] == ["1.png"] and kept.skipped == [tmp_path / "img" / "0.png"]


def test_random_augmentation_and_caption_dropout_depend_on_seed_epoch_and_index(tmp_path):
    for i in range(8):
        _image(tmp_path / f"{i}.png", size=(64, 40), seed=i)
    records = sd_data.read_records(tmp_path, instance_prompt="sks")
    dataset = sd_data.SDImageDataset(records, resolution=32, crop="random", flip=True, caption_dropout=0.5, seed=1)
    first = [dataset[i] for i in range(8)]
    again = [dataset[i] for i in range(8)]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) and a["prompt"] == b["prompt"]
               for a, b in zip(first, again, strict=True))
    assert {item["prompt"] for item in first} == {"", "sks"}
    dataset.set_epoch(1)
    assert any(not torch.equal(a["pixel_values"], dataset[i]["pixel_values"]) for i, a in enumerate(first))


def test_class_images_follow_the_instance_half(tmp_path, sd_model):
    for i in range(2):
        _image(tmp_path / "inst" / f"{i}.png", seed=i)
    for i in range(3):
        _image(tmp_path / "cls" / f"{i}.png", seed=10 + i)
    dataset = sd_data.SDImageDataset(sd_data.read_records(tmp_path / "inst", instance_prompt="sks dog"), resolution=32,
                                     class_records=sd_data.read_records(tmp_path / "cls", instance_prompt="dog"))
    assert len(dataset) == 3
    batch = sd_data.collate([dataset[0], dataset[1]], sd_model.tokenize)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["is_class"].tolist() == [False, False, True, True]
    assert torch.equal(batch["input_ids"][2], sd_model.tokenize("dog")["input_ids"][0])


def test_cached_latents_are_the_vae_posterior_of_the_center_crop(tmp_path, sd_model):
    _image(tmp_path / "0.png", size=(48, 32))
    records = sd_data.read_records(tmp_path, instance_prompt="x")
    dataset = sd_data.SDImageDataset(records, resolution=32)
    pixels = dataset[0]["pixel_values"]
    with torch.no_grad():
        dataset.set_latent_cache(lambda px: sd_model.vae.encode(px).latent_dist.parameters)
        expected = sd_model.vae.encode(pixels[None]).latent_dist.parameters[0]
    item = dataset[0]
    assert "pixel_values" not in item and torch.allclose(item["latent_dist"], expected, atol=1e-6)
    with pytest.raises(DataError, match="crop: center"):
        sd_data.SDImageDataset(records, resolution=32, flip=True).set_latent_cache(lambda px: px)


def test_cached_and_uncached_items_give_the_same_micro_conditioning(tmp_path, sd_model):
    _image(tmp_path / "inst" / "0.png", size=(48, 32))
    _image(tmp_path / "cls" / "0.png", size=(32, 56), seed=1)
    records = sd_data.read_records(tmp_path / "inst", instance_prompt="x")
    class_records = sd_data.read_records(tmp_path / "cls", instance_prompt="y")
    uncached = sd_data.SDImageDataset(records, resolution=32, class_records=class_records)
    cached = sd_data.SDImageDataset(records, resolution=32, class_records=class_records)
    with torch.no_grad():
        cached.set_latent_cache(lambda px: sd_model.vae.encode(px).latent_dist.parameters)
    plain, fast = uncached[0], cached[0]
    assert "latent_dist" in fast and "pixel_values" in plain
    assert plain["original_size"].tolist() == [32, 48] and plain["crop_top_left"].tolist() == [0, 8]
    assert plain["class_original_size"].tolist() == [56, 32] and plain["class_crop_top_left"].tolist() == [12, 0]
    for key in ("original_size", "crop_top_left", "class_original_size", "class_crop_top_left"):
        assert torch.equal(fast[key], plain[key]), key
    plain_batch = sd_data.collate([plain], sd_model.tokenize)
    fast_batch = sd_data.collate([fast], sd_model.tokenize)
    assert torch.equal(fast_batch["original_size"], plain_batch["original_size"])
    assert torch.equal(fast_batch["crop_top_left"], plain_batch["crop_top_left"])


# --- config ---------------------------------------------------------------------------------------


def _config(tmp_path, **data) -> dict:
    return {"task": "diffusion", "model": {"name": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
            "method": {"name": "lora"}, "data": {"root": str(tmp_path), **data}, "train": {"max_steps": 1},
            "output_dir": str(tmp_path / "run")}


@pytest.mark.parametrize(("data", "method", "message"), [
    ({"resolution": 30}, "lora", "data.resolution: 30"),
    ({"crop": "corner"}, "lora", "data.crop"),
    ({"colour": 1}, "lora", r"data: unknown key\(s\) \['colour'\]"),
    ({"loss": {"snr_gamma": -1.0}}, "lora", "data.loss.snr_gamma"),
    ({"loss": {"gamma": 5}}, "lora", r"data.loss: unknown key\(s\) \['gamma'\]"),
    ({"sampling": {"prompts": "a cat"}}, "lora", "data.sampling.prompts: expected list"),
    ({"class_prompt": "a dog"}, "lora", "prior preservation needs both"),
    ({"class_root": "/nonexistent", "class_prompt": "a dog"}, "lora", "does not generate them"),
    ({"condition": "canny"}, "lora", "only the t2i_adapter method"),
    ({}, "t2i_adapter", "t2i_adapter trains on condition images"),
    ({"condition": "depth"}, "t2i_adapter", "not a built-in extractor"),
    ({"cache_latents": True, "flip": True}, "lora", "data.cache_latents"),
    ({"format": "dreambooth"}, "lora", "data.instance_prompt: missing"),
    ({"flip": "yes"}, "lora", "data.flip: expected true or false"),
])
def test_check_config_names_the_key(tmp_path, data, method, message):
    from visionpeft.runconfig import parse_run_config

    tree = _config(tmp_path, **data)
    tree["method"] = {"name": method}
    with pytest.raises(ConfigError, match=message):
        parse_run_config(tree)


def test_check_config_requires_a_model_and_a_root(tmp_path):
    from visionpeft.runconfig import parse_run_config

    tree = _config(tmp_path)
    del tree["model"]
    with pytest.raises(ConfigError, match="model.name: missing"):
        parse_run_config(tree)
    tree = _config(tmp_path)
    del tree["data"]["root"]
    with pytest.raises(ConfigError, match="data.root: missing"):
        parse_run_config(tree)


def test_build_model_rejects_a_scheduler_prediction_type_training_cannot_use(tmp_path):
    from visionpeft.runconfig import parse_run_config
    from visionpeft.task import get_task

    pipeline = save_tiny_sd_pipeline(tmp_path / "tiny-sd")
    config_path = pipeline / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "sample"}))
    run = parse_run_config({"task": "diffusion", "model": {"name": str(pipeline)}, "method": {"name": "lora"},
                            "data": {"root": str(tmp_path), "resolution": 32}, "train": {"max_steps": 1},
                            "output_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match=r"prediction_type 'sample'; training supports \['epsilon', 'v_prediction'\]"):
        get_task("diffusion")(run).build_model()


# --- sampling -------------------------------------------------------------------------------------


def test_sampling_writes_a_seeded_grid_and_leaves_rng_and_modes_alone(tmp_path, sd_model):
    model = copy.deepcopy(sd_model)
    model.unet.train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    path = save_samples(model, ["a cat", "a dog"], [5, 6], tmp_path, step=12, num_inference_steps=2,
                        guidance_scale=2.0, height=32, width=32)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.unet.training and not model.vae.training
    assert path == tmp_path / "samples" / "step-0000012_seed-5.png"
    assert Image.open(path).size == (64, 32)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["prompts"] == [{"prompt": "a cat", "seed": 5}, {"prompt": "a dog", "seed": 6}]
    again = save_samples(model, ["a cat", "a dog"], [5, 6], tmp_path / "again", step=12, num_inference_steps=2,
                         guidance_scale=2.0, height=32, width=32)
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(again)))


# --- the examples, end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion-e2e")
    pipeline = save_tiny_sd_pipeline(root / "tiny-sd")
    for i in range(2):
        _image(root / "images" / f"{i}.png", size=(40, 36), seed=i)
        _image(root / "class" / f"{i}.png", size=(36, 40), seed=10 + i)
    (root / "images" / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{i}.png", "text": f"a photo number {i}"}) for i in range(2)))
    return root, pipeline


def _overrides(root: Path, pipeline: Path, output: Path) -> list[str]:
    return [f"model.name={pipeline}", "model.kwargs={}", f"data.root={root / 'images'}", "data.resolution=32",
            "data.sampling.steps=2", "data.sampling.prompts=[a cat]", "train.max_steps=2", "train.batch_size=2",
            "train.grad_accum=1",
            "train.precision=fp32", "train.eval_every=0", "train.save_every=0", "train.progress=false",
            f"output_dir={output}"]


def _train(config: Path, overrides: list[str]) -> dict:
    from visionpeft.cli import main

    assert main(["train", str(config), *(a for o in overrides for a in ("--set", o))]) == 0
    return {}


def test_example_dreambooth_lora_runs_and_its_files_load(tiny_run_inputs, tmp_path):
    root, pipeline = tiny_run_inputs
    config = EXAMPLES / "diffusion_dreambooth_lora.yaml"
    overrides = [*_overrides(root, pipeline, tmp_path / "run"), f"data.class_root={root / 'class'}"]
    run = load_run_config(config, overrides)
    assert run.method.method == "lora" and run.data.class_prompt == "a photo of dog"
    _train(config, overrides)
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["eval"]["samples"] == 1
    assert (out / records[-1]["eval"]["grid"]).is_file()
    for weight_name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        tiny_sd_pipeline().load_lora_weights(out, weight_name=weight_name)
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_example_textual_inversion_runs_and_its_embedding_loads(tiny_run_inputs, tmp_path):
    root, pipeline = tiny_run_inputs
    config = EXAMPLES / "diffusion_textual_inversion.yaml"
    # "toy" is not one token of the tiny handwritten vocabulary; "a" is.
    overrides = [*_overrides(root, pipeline, tmp_path / "run"), "method.initializer_token=a"]
    assert load_run_config(config, overrides).method.placeholder_token == "<cat-toy>"
    _train(config, overrides)
    pipe = tiny_sd_pipeline()
    pipe.load_textual_inversion(tmp_path / "run")
    assert "<cat-toy>" in pipe.tokenizer.get_vocab()


def test_example_t2i_adapter_runs_and_its_adapter_loads(tiny_run_inputs, tmp_path):
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    root, pipeline = tiny_run_inputs
    config = EXAMPLES / "diffusion_t2i_adapter_canny.yaml"
    overrides = _overrides(root, pipeline, tmp_path / "run")
    assert load_run_config(config, overrides).data.condition == "canny"
    _train(config, overrides)
    adapter = T2IAdapter.from_pretrained(tmp_path / "run" / "t2i_adapter")
    assert adapter.config.in_channels == 1
    parts = tiny_sd_pipeline().components
    pipe = StableDiffusionAdapterPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        adapter=adapter, scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    out = pipe("a cat", image=Image.new("L", (32, 32)), num_inference_steps=2, height=32, width=32).images
    assert len(out) == 1


def test_textual_inversion_refuses_prompts_without_its_placeholder_before_training(tiny_run_inputs, tmp_path, capsys):
    from visionpeft.cli import main

    root, pipeline = tiny_run_inputs
    config = EXAMPLES / "diffusion_textual_inversion.yaml"
    overrides = [*_overrides(root, pipeline, tmp_path / "run"), "method.initializer_token=a"]
    for prompt, source, example in ((None, f"column 'text' of {root / 'images' / 'metadata.jsonl'}",
                                     "a photo number 0"),
                                    ("a photo of a toy", "data.instance_prompt", "a photo of a toy")):
        args = [f"data.instance_prompt={'null' if prompt is None else prompt}", *overrides]
        assert main(["train", str(config), *(a for o in args for a in ("--set", o))]) == 2
        assert (f"method.placeholder_token: '<cat-toy>' is in none of the 2 training prompts ({source}), "
                f"e.g. '{example}'") in capsys.readouterr().err
        assert not (tmp_path / "run" / "adapter").exists()


def test_sampling_conditions_are_center_cropped_as_training_images_not_stretched(tiny_run_inputs, tmp_path):
    root, pipeline = tiny_run_inputs
    wide = np.zeros((32, 64), dtype=np.uint8)
    wide[:, 16:48] = 255  # a white centre square between black sides
    Image.fromarray(wide).save(tmp_path / "wide.png")
    overrides = [*_overrides(root, pipeline, tmp_path / "run"), f"data.sampling.conditions=[{tmp_path / 'wide.png'}]"]
    task = load_run_config(EXAMPLES / "diffusion_t2i_adapter_canny.yaml", overrides).make_task()
    task.build_model()
    [condition] = task._sample_conditions([0])
    assert condition.size == (32, 32) and condition.mode == "L"
    assert np.asarray(condition).min() == 255  # stretched, the black sides would remain


def test_an_interrupted_run_resumes_to_the_same_lora(tiny_run_inputs, tmp_path):
    """Random crops, flips, caption dropout, noise and timesteps all replay after a resume."""
    from safetensors.torch import load_file

    from visionpeft.runconfig import parse_run_config
    from visionpeft.task import get_task
    from visionpeft.train import Trainer

    root, pipeline = tiny_run_inputs
    results = {}
    for name, stop in (("whole", None), ("resumed", 2)):
        run = parse_run_config({
            "task": "diffusion", "model": {"name": str(pipeline)}, "method": {"name": "lora", "r": 2},
            "data": {"root": str(root / "images"), "resolution": 32, "crop": "random", "flip": True,
                     "caption_dropout": 0.5, "loss": {"snr_gamma": 5.0, "noise_offset": 0.05},
                     "eval_images": 0, "sampling": {"prompts": []}},
            "train": {"max_steps": 3, "batch_size": 1, "lr": 1e-3, "progress": False},
            "output_dir": str(tmp_path / name),
        })
        for resume in ([False, True] if stop else [False]):
            task = get_task("diffusion")(run)
            Trainer(task, run.train, run.output_dir, model=task.build_model()).fit(
                resume=resume, stop_after=None if resume else stop)
        results[name] = load_file(tmp_path / name / "adapter" / "adapter.safetensors")
    whole, resumed = results["whole"], results["resumed"]
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_sdxl_loss_uses_the_batch_micro_conditioning():
    import visionpeft as vp

    from test_diffusion_model import tiny_sdxl_model

    model = vp.attach(tiny_sdxl_model(), "lora", r=2)
    batch = {"pixel_values": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
             **model.tokenize(["a cat", "a dog"]), "original_size": torch.tensor([[64, 48], [32, 32]]),
             "crop_top_left": torch.tensor([[8, 0], [0, 0]]), "is_class": torch.tensor([False, False])}
    seen = {}
    hook = model.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs["added_cond_kwargs"]), with_kwargs=True)
    torch.manual_seed(0)
    loss = diffusion_loss(model, batch)
    hook.remove()
    loss.backward()
    assert seen["time_ids"].tolist() == [[64, 48, 8, 0, 32, 32], [32, 32, 0, 0, 32, 32]]
    assert seen["text_embeds"].shape == (2, 32)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_cubic_timestep_sampling_is_t2i_adapters_and_favours_noisy_steps():
    from visionpeft.diffusion.loss import sample_timesteps

    torch.manual_seed(0)
    cubic = sample_timesteps(20000, 1000, torch.device("cpu"), "cubic")
    torch.manual_seed(0)
    u = torch.rand(20000)
    assert torch.equal(cubic, ((1 - u**3) * 1000).long().clamp(0, 999))
    uniform = sample_timesteps(20000, 1000, torch.device("cpu"), "uniform")
    assert cubic.min() >= 0 and cubic.max() <= 999 and uniform.min() >= 0 and uniform.max() <= 999
    # P(t >= 500) = P(u^3 <= 1/2) = 0.5^(1/3) = 0.794 for cubic, 0.5 for uniform.
    assert abs((cubic >= 500).float().mean().item() - (0.5 ** (1 / 3))) < 0.02
    assert abs((uniform >= 500).float().mean().item() - 0.5) < 0.02


def test_empty_yaml_values_mean_the_defaults(tmp_path):
    """``loss:`` with every entry commented out, or ``noise_offset:`` left empty, is null: the default."""
    from visionpeft.diffusion.task import DiffusionData
    from visionpeft.runconfig import parse_run_config

    run = parse_run_config(_config(tmp_path, loss=None, sampling={"prompts": None, "steps": None},
                                   resolution=None))
    assert run.data == DiffusionData(root=str(tmp_path))
    run = parse_run_config(_config(tmp_path, loss={"noise_offset": None, "snr_gamma": 5.0}))
    assert run.data.loss.noise_offset == 0.0 and run.data.loss.snr_gamma == 5.0
