"""LoRA on Stable Diffusion: target presets, training, and the diffusers / kohya files reloaded by diffusers."""

from __future__ import annotations

import copy
import json

import pytest

pytest.importorskip("diffusers")

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import visionpeft as vp
from visionpeft.cli import main as cli_main
from visionpeft.diffusion import kohya, lora_export
from visionpeft.diffusion.loss import diffusion_loss
from visionpeft.diffusion.models import StableDiffusionModel
from visionpeft.errors import AdapterError, ConfigError
from visionpeft.method import get_state

from tiny_models import tiny_sd_pipeline

ALL = ["@unet_attn", "@unet_ff", "@unet_conv", "@text_encoder"]


@pytest.fixture(scope="module")
def base() -> StableDiffusionModel:
    return StableDiffusionModel.from_pipeline(_fresh_pipeline())


def _model(base: StableDiffusionModel) -> StableDiffusionModel:
    return copy.deepcopy(base)


def _trained(base: StableDiffusionModel, r: int = 4, alpha: float = 16.0, targets=None) -> StableDiffusionModel:
    """A LoRA moved off its zero init, as training would."""
    model = vp.attach(_model(base), "lora", r=r, alpha=alpha, targets=targets or ALL)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _outputs(model: StableDiffusionModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    ids = model.tokenize(["a photo of a cat", "a dog on the beach"])
    with torch.no_grad():
        return model(latents, torch.tensor([20, 600]), ids["input_ids"])


_PIPE = []


def _fresh_pipeline():
    # Built once and copied: a copy costs milliseconds, a build seconds.
    if not _PIPE:
        _PIPE.append(tiny_sd_pipeline())
    return copy.deepcopy(_PIPE[0])


def _reloaded(directory, weight_name=None) -> StableDiffusionModel:
    pipe = _fresh_pipeline()
    pipe.load_lora_weights(directory, **({"weight_name": weight_name} if weight_name else {}))
    return StableDiffusionModel.from_pipeline(pipe)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= 1e-6


def test_presets_select_the_documented_layers(base):
    names = {n: type(m).__name__ for n, m in base.named_modules()}
    expected = {
        "@unet_attn": [n for n in names if n.startswith("unet.")
                       and n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))],
        "@unet_ff": [n for n in names if n.startswith("unet.") and n.endswith((".ff.net.0.proj", ".ff.net.2"))],
        "@unet_conv": [n for n in names if n.startswith("unet.") and (
            n.endswith((".conv1", ".conv2", ".conv_shortcut", ".proj_in", ".proj_out"))
            or n.endswith(("downsamplers.0.conv", "upsamplers.0.conv")))],
        "@text_encoder": [n for n in names if n.startswith("text_encoder.") and n.endswith(
            (".q_proj", ".k_proj", ".v_proj", ".out_proj"))],
    }
    for preset, modules in expected.items():
        model = vp.attach(_model(base), "lora", r=2, targets=[preset])
        adapted = {k.rsplit(".lora_", 1)[0] for k in get_state(model).adapters["default"].method.trained_tensors(model)}
        assert adapted == set(modules), preset
        assert modules, preset
    default = vp.attach(_model(base), "lora", r=2)
    adapted = {k.rsplit(".lora_", 1)[0] for k in get_state(default).adapters["default"].method.trained_tensors(default)}
    # 6 transformer blocks (2 down, 1 mid, 3 up) x (attn1, attn2) x (q, k, v, out)
    assert adapted == set(expected["@unet_attn"]) and len(adapted) == 6 * 2 * 4


def test_an_unknown_preset_names_the_host_presets(base):
    with pytest.raises(ConfigError, match="@text_encoder, @unet_attn, @unet_conv, @unet_ff"):
        vp.attach(_model(base), "lora", targets=["@unet_everything"])


def test_a_few_lora_steps_lower_the_loss_on_a_fixed_batch(base):
    model = vp.attach(_model(base), "lora", r=4, alpha=4, targets=["@unet_attn"])
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, **model.tokenize(["a cat", "a dog"])}
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=2e-2)

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same latents sample, noise and timesteps every time: a fixed batch
        return diffusion_loss(model, batch)

    with torch.no_grad():
        before = loss().item()
    for _ in range(3):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = loss().item()
    assert after < before * 0.98, (before, after)
    assert all(p.dtype == torch.float32 for p in trained)


@pytest.mark.parametrize(("r", "alpha"), [(4, 16.0), (2, 3.0)])
def test_both_exports_reload_exactly_through_load_lora_weights(base, tmp_path, r, alpha):
    model = _trained(base, r, alpha)
    expected = _outputs(model)
    paths = lora_export.export_lora(model, tmp_path)
    assert paths["diffusers"].name == "pytorch_lora_weights.safetensors"
    assert _close(_outputs(_reloaded(tmp_path)), expected)
    assert _close(_outputs(_reloaded(tmp_path, weight_name=paths["kohya"].name)), expected)
    assert not torch.equal(expected, _outputs(base))


def test_without_the_alpha_metadata_diffusers_would_reload_wrong(base, tmp_path):
    """The control for the test above: the metadata is what keeps alpha != r right."""
    model = _trained(base, 4, 16.0)
    expected = _outputs(model)
    path = lora_export.export_lora(model, tmp_path)["diffusers"]
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 16.0 and meta["text_encoder.lora_alpha"] == 16.0
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(load_file(path), bare / "pytorch_lora_weights.safetensors", metadata={"format": "pt"})
    assert (_outputs(_reloaded(bare)) - expected).abs().max().item() > 1e-3


def test_kohya_export_has_kohya_keys_true_alpha_and_ss_metadata(base, tmp_path):
    model = _trained(base, 4, 16.0)
    path = lora_export.export_lora(model, tmp_path, ss_output_name="dog")["kohya"]
    tensors = load_file(path)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert tensors[f"{name}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{name}.lora_up.weight"].shape == (32, 4)
    assert tensors[f"{name}.alpha"].item() == 16.0 and tensors[f"{name}.alpha"].ndim == 0
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert f"{te}.lora_down.weight" in tensors and tensors[f"{te}.alpha"].item() == 16.0
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "16"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"] == "dog"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "16"}


def test_kohya_and_diffusers_convert_into_each_other_losslessly(base, tmp_path):
    weights = lora_export.from_model(_trained(base, 4, 12.0))
    kohya_path = lora_export.save_kohya(weights, tmp_path / "k.safetensors")
    from_kohya = lora_export.read_lora_file(kohya_path)
    diffusers_path = lora_export.save_diffusers(from_kohya, tmp_path / "d")
    again = lora_export.read_lora_file(diffusers_path)
    for other in (from_kohya, again):
        assert other.modules == weights.modules
        assert other.alphas == weights.alphas
        assert all(torch.equal(other.down[m], weights.down[m]) and torch.equal(other.up[m], weights.up[m])
                   for m in weights.modules)
    back = lora_export.save_kohya(again, tmp_path / "k2.safetensors")
    first, second = load_file(kohya_path), load_file(back)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_module_names_survive_the_kohya_flattening(base):
    layers = [n for n, m in base.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(layers) > 100
    for module in layers:
        if module.startswith(("unet.", "text_encoder.")):
            assert kohya.kohya_to_module(kohya.module_to_kohya(module, False)) == module
            assert kohya.kohya_to_module(kohya.module_to_kohya(module, True)) == module


@pytest.mark.parametrize("name", [
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_output_blocks_2_0_in_layers_2",
])
def test_sgm_named_sdxl_kohya_files_are_refused_with_their_key(tmp_path, name):
    path = tmp_path / "sgm.safetensors"
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 8), f"{name}.lora_up.weight": torch.zeros(8, 2),
               f"{name}.alpha": torch.tensor(2.0)}, str(path))
    with pytest.raises(AdapterError, match=rf"{name}.*SGM.*pipe\.load_lora_weights"):
        lora_export.read_lora_file(path)


def test_a_kohya_name_part_that_is_no_module_name_is_refused():
    # "attentionz" is no module name: the converter would otherwise emit a path no model has.
    name = "lora_unet_down_blocks_0_attentionz_0_proj_in"
    with pytest.raises(AdapterError, match=rf"{name}.*'attentionz' is not a diffusers UNet or CLIP"):
        kohya.kohya_to_module(name)
    assert kohya.kohya_to_module("lora_unet_down_blocks_0_attentions_0_proj_in") == (
        "unet.down_blocks.0.attentions.0.proj_in")


def test_a_dora_diffusers_file_is_refused_as_dora(tmp_path):
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    path = tmp_path / "dora.safetensors"
    save_file({f"{module}.lora_A.weight": torch.zeros(2, 8), f"{module}.lora_B.weight": torch.zeros(8, 2),
               f"{module}.lora_magnitude_vector": torch.ones(8)}, str(path))
    with pytest.raises(AdapterError, match=r"lora_magnitude_vector.*DoRA LoRA files are not supported"):
        lora_export.read_lora_file(path)


def test_per_module_alphas_of_a_kohya_file_survive_conversion(base, tmp_path):
    """A kohya file with a different alpha per module converts to diffusers' alpha_pattern exactly.

    (diffusers 0.42.1's own kohya loader drops per-module alphas: its alpha_pattern keys come out as
    ``...processor.to_k_lora.down.weight`` and peft ignores them, so the check is against the file.)
    """
    from peft.tuners.lora import LoraLayer

    model = _trained(base, 4, 8.0, targets=["@unet_attn"])
    tensors, meta = lora_export.kohya_state_dict(lora_export.from_model(model))
    alphas = [k for k in tensors if k.endswith(".alpha")]
    for i, key in enumerate(alphas[:5]):
        tensors[key] = torch.tensor(float(i + 1))
    save_file(tensors, tmp_path / "mixed.safetensors", metadata=meta)
    weights = lora_export.read_lora_file(tmp_path / "mixed.safetensors")
    assert sorted(set(weights.alphas.values())) == [1.0, 2.0, 3.0, 4.0, 5.0, 8.0]
    lora_export.save_diffusers(weights, tmp_path / "converted")
    reloaded = _reloaded(tmp_path / "converted")
    layers = {n: m for n, m in reloaded.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == len(alphas)
    for name, layer in layers.items():
        key = kohya.module_to_kohya(name, False)
        (adapter,) = layer.scaling
        assert layer.scaling[adapter] == tensors[f"{key}.alpha"].item() / 4, name
        assert torch.equal(layer.lora_A[adapter].weight, tensors[f"{key}.lora_down.weight"])
        assert torch.equal(layer.lora_B[adapter].weight, tensors[f"{key}.lora_up.weight"])


def test_export_lora_cli_converts_both_ways(base, tmp_path, capsys):
    model = _trained(base, 4, 16.0)
    vp.save(model, tmp_path / "run" / "adapter")
    expected = _outputs(model)
    assert cli_main(["export", "lora", "--adapter", str(tmp_path / "run"), "--format", "kohya"]) == 0
    kohya_file = tmp_path / "run" / "lora_kohya.safetensors"
    assert str(kohya_file) in capsys.readouterr().out
    direct = lora_export.kohya_state_dict(lora_export.from_model(model))[0]
    written = load_file(kohya_file)
    assert written.keys() == direct.keys() and all(torch.equal(written[k], direct[k]) for k in direct)
    out = tmp_path / "converted"
    argv = ["export", "lora", "--adapter", str(kohya_file), "--format", "diffusers", "--output", str(out)]
    assert cli_main(argv) == 0
    assert _close(_outputs(_reloaded(out)), expected)
    assert cli_main(["export", "lora", "--adapter", str(tmp_path / "nothing"), "--format", "kohya"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["export", "nothing"]) == 2
    assert "exporters: lora" in capsys.readouterr().err


def test_sdxl_lora_exports_reload_in_the_sdxl_pipeline(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from test_diffusion_model import tiny_sdxl_model

    model = vp.attach(tiny_sdxl_model(), "lora", r=2, alpha=6.0, targets=["@unet_attn", "@text_encoder"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    latents = torch.randn(1, 4, 16, 16, generator=g)
    ids = model.tokenize(["a photo of a cat"])
    with torch.no_grad():
        expected = model(latents, torch.tensor([50]), ids["input_ids"], ids["input_ids_2"])
    paths = lora_export.export_lora(model, tmp_path)
    keys = load_file(paths["kohya"]).keys()
    assert any(k.startswith("lora_te1_text_model_") for k in keys) and any(k.startswith("lora_te2_text_model_")
                                                                           for k in keys)
    with safe_open(paths["kohya"], "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    for weight_name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        fresh = tiny_sdxl_model()
        pipe = StableDiffusionXLPipeline(**{k: getattr(fresh, k) for k in (
            "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")})
        pipe.load_lora_weights(tmp_path, weight_name=weight_name)
        with torch.no_grad():
            got = fresh(latents, torch.tensor([50]), ids["input_ids"], ids["input_ids_2"])
        assert _close(got, expected), weight_name


def test_two_lora_adapters_each_export_into_their_own_folder(base, tmp_path):
    """The end of a run calls every adapter's export: two LoRAs must not collide (or stop the run)."""
    from visionpeft.method import RunInfo, attached_methods

    model = vp.attach(_model(base), "lora", r=2, name="style")
    model = vp.attach(model, "lora", r=4, name="subject")
    for method in attached_methods(model):
        method.export(model, tmp_path, RunInfo(step=3))
    for name, rank in (("style", 2), ("subject", 4)):
        with safe_open(str(tmp_path / name / "lora_kohya.safetensors"), "pt") as f:
            assert f.metadata()["ss_output_name"] == name
            down = next(k for k in f.keys() if k.endswith("lora_down.weight"))  # noqa: SIM118 (safe_open)
            assert f.get_tensor(down).shape[0] == rank
        assert (tmp_path / name / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
