"""The tiny real backbones of ``tiny_models`` build deterministically, run, and have the expected names.

The name checks pin the facts the domain adapters rely on (timm's ``attn.qkv`` / ``mlp.fc1``, open_clip's
``nn.MultiheadAttention``, diffusers' ``to_q`` ... ``to_out.0``) against the real classes, so a library
upgrade that renames a layer fails here first, with a clear message. Each library is optional: its tests
skip when it is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from torch import nn

import tiny_models


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Assert two modules have the same state-dict keys and bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_module_imports_without_domain_libraries() -> None:
    """The module defers every domain import to its functions: it imports with all of them blocked."""
    blocked = ("timm", "open_clip", "diffusers", "transformers", "tokenizers", "huggingface_hub")
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        "import tiny_models\n"
        "assert tiny_models.CONTEXT_LENGTH == 77\n"
    )
    tests_dir = str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tests_dir, timeout=60)


# ---------------------------------------------------------------------------------------------- timm


def test_tiny_vit_deterministic_and_runs() -> None:
    pytest.importorskip("timm")
    a, b = tiny_models.tiny_vit(), tiny_models.tiny_vit()
    assert_same_state(a, b)
    assert not torch.equal(a.head.weight, tiny_models.tiny_vit(seed=1).head.weight)
    a.eval()
    with torch.no_grad():
        assert a(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("overrides", "prefix_tokens"),
    [
        ({"class_token": False, "global_pool": "avg"}, 0),
        ({"reg_tokens": 2}, 3),
        ({"dynamic_img_size": True}, 1),
    ],
)
def test_tiny_vit_overrides(overrides: dict, prefix_tokens: int) -> None:
    pytest.importorskip("timm")
    model = tiny_models.tiny_vit(**overrides).eval()
    assert model.num_prefix_tokens == prefix_tokens
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        if overrides.get("dynamic_img_size"):
            assert model(torch.randn(1, 3, 48, 40)).shape == (1, 10)


def test_timm_parameter_names() -> None:
    pytest.importorskip("timm")
    model = tiny_models.tiny_vit()
    assert isinstance(model.patch_embed.proj, nn.Conv2d)
    assert len(model.blocks) == 2
    for block in model.blocks:
        for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert isinstance(layer, nn.Linear)
        assert block.attn.qkv.out_features == 3 * 64
        assert block.mlp.fc1.out_features == 128
    names = {name for name, _ in model.named_modules()}
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"} <= names
    assert "patch_embed.proj" in names and "head" in names


# ------------------------------------------------------------------------------------------ open_clip


def test_tiny_clip_deterministic_and_runs() -> None:
    pytest.importorskip("open_clip")
    a, b = tiny_models.tiny_clip(), tiny_models.tiny_clip()
    assert_same_state(a, b)
    tokens = tiny_models.clip_tokenizer()(["a photo of a dog."])
    assert tokens.shape == (1, 77)
    assert tokens[0, :8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407]
    a.eval()
    with torch.no_grad():
        assert a.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 64)
        assert a.encode_text(tokens).shape == (1, 64)


def test_tiny_custom_text_clip_deterministic_and_runs() -> None:
    open_clip = pytest.importorskip("open_clip")
    a, b = tiny_models.tiny_custom_text_clip(), tiny_models.tiny_custom_text_clip()
    assert isinstance(a, open_clip.CustomTextCLIP)
    assert isinstance(a.text, open_clip.transformer.TextTransformer)
    assert_same_state(a, b)
    a.eval()
    with torch.no_grad():
        assert a.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 64)
        assert a.encode_text(tiny_models.clip_tokenizer()(["a photo of a dog."])).shape == (1, 64)


def test_open_clip_parameter_names() -> None:
    pytest.importorskip("open_clip")
    clip, custom = tiny_models.tiny_clip(), tiny_models.tiny_custom_text_clip()
    towers = {
        "visual": clip.visual.transformer,
        "text": clip.transformer,
        "custom visual": custom.visual.transformer,
        "custom text": custom.text.transformer,
    }
    for where, transformer in towers.items():
        assert len(transformer.resblocks) == 2, where
        for block in transformer.resblocks:
            assert isinstance(block.attn, nn.MultiheadAttention), where
            assert isinstance(block.attn.out_proj, nn.Linear), where
            assert block.attn.in_proj_weight.shape[0] == 3 * block.attn.embed_dim, where
            assert isinstance(block.mlp.c_fc, nn.Linear) and isinstance(block.mlp.c_proj, nn.Linear), where
    assert isinstance(clip.visual.conv1, nn.Conv2d)
    assert clip.visual.positional_embedding.shape == (1 + 4 * 4, 64)
    assert clip.positional_embedding.shape == (77, 48)


# ---------------------------------------------------------------------------------- tiny CLIP tokenizer


def test_tiny_clip_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    tokenizer = tiny_models.tiny_clip_tokenizer()
    assert len(tokenizer) == 519
    assert tokenizer.model_max_length == 77
    ids = tokenizer("a photo of a cat", padding="max_length").input_ids
    assert len(ids) == 77
    tokens = tokenizer.convert_ids_to_tokens(ids[:9])
    assert tokens == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "c",
        "a",
        "t</w>",
        "<|endoftext|>",
    ]
    assert ids[9:] == [tokenizer.pad_token_id] * (77 - 9)

    from transformers import CLIPTokenizer

    folder = tiny_models.tiny_clip_tokenizer_files(tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]
    from_files = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77
    )
    assert from_files("a photo of a cat", padding="max_length").input_ids == ids


# ---------------------------------------------------------------------------------- Stable Diffusion


@pytest.fixture(scope="module")
def sd_pipeline():
    """One tiny pipeline shared by the SD tests (building it is the slow part)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    return tiny_models.tiny_sd_pipeline()


def _generate(pipe, seed: int = 0) -> torch.Tensor:
    """2-step 32 px inference with a seeded CPU generator."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        "a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="pt", generator=generator
    ).images


def test_tiny_sd_components_deterministic() -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    a, b = tiny_models.tiny_sd_components(), tiny_models.tiny_sd_components()
    assert set(a) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(a[name], b[name])
    te_config = a["text_encoder"].config
    tokenizer = a["tokenizer"]
    assert te_config.vocab_size == len(tokenizer)
    assert (te_config.bos_token_id, te_config.eos_token_id, te_config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )


def test_tiny_sd_pipeline_runs(sd_pipeline) -> None:
    images = _generate(sd_pipeline)
    assert images.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all()
    assert torch.equal(images, _generate(sd_pipeline))


def test_saved_tiny_sd_pipeline_reloads_offline(sd_pipeline, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    folder = tiny_models.save_tiny_sd_pipeline(tmp_path / "tiny-sd")
    reloaded = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.tokenizer.model_max_length == 77
    assert reloaded.safety_checker is None
    assert type(reloaded.scheduler) is type(sd_pipeline.scheduler)
    assert_same_state(reloaded.unet, sd_pipeline.unet)
    assert torch.equal(_generate(reloaded), _generate(sd_pipeline))


def test_diffusers_parameter_names(sd_pipeline) -> None:
    unet = sd_pipeline.unet
    suffixes = ("to_q", "to_k", "to_v", "to_out.0")
    found = {suffix: [] for suffix in suffixes}
    for name, module in unet.named_modules():
        for suffix in suffixes:
            if name.endswith("." + suffix):
                assert isinstance(module, nn.Linear), name
                found[suffix].append(name)
    # 6 transformer blocks (2 down, 1 mid, 3 up), each with self- (attn1) and cross-attention (attn2).
    assert all(len(names) == 12 for names in found.values()), {k: len(v) for k, v in found.items()}
    cross = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2")
    assert cross.to_k.in_features == 32 and cross.to_q.in_features == 32
    # transformers 5: CLIPTextModel has no ``text_model`` level; the attention layers are ``*_proj``.
    text_keys = set(sd_pipeline.text_encoder.state_dict())
    assert "encoder.layers.0.self_attn.q_proj.weight" in text_keys
    assert "encoder.layers.4.self_attn.out_proj.weight" in text_keys
