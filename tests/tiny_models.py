"""Tiny but real backbones, built offline from the libraries' own classes, for domain tests.

Every builder constructs a randomly initialised model from the real timm / open_clip / diffusers /
transformers classes with tiny dimensions, so tests exercise the genuine module names, shapes and
forward code paths without downloading anything. Each builder calls ``torch.manual_seed(seed)``
first, so two calls with the same seed give bit-identical weights.

The domain libraries are imported lazily inside the functions: this module imports (and its
constants are usable) when none of them is installed, and tests skip with ``pytest.importorskip``.

``HF_HUB_OFFLINE=1`` is set (unless already set) before anything can import ``huggingface_hub``:
nothing here needs the hub, and an accidental hub call would otherwise retry for about 46 s.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import open_clip
    from diffusers import StableDiffusionPipeline
    from timm.models.vision_transformer import VisionTransformer
    from transformers import CLIPTokenizer

#: Text context length shared by the tiny CLIP, the tiny tokenizer and the tiny SD text encoder.
CONTEXT_LENGTH = 77

#: The handwritten BPE merges of the tiny CLIP tokenizer: enough to make "photo" and "of" one token.
TINY_MERGES: tuple[str, ...] = ("o f</w>", "p h", "ph o", "pho t", "phot o</w>")

#: Keyword arguments of the tiny timm ViT; ``tiny_vit(**overrides)`` updates a copy.
TINY_VIT_KWARGS: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 8,
    "depth": 2,
    "embed_dim": 64,
    "num_heads": 4,
    "mlp_ratio": 2.0,
    "num_classes": 10,
}

#: Configuration of the tiny open_clip model (a ViT image tower and a 2-layer text transformer).
TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2},
}


# ---------------------------------------------------------------------------------------------- timm


def tiny_vit(seed: int = 0, **overrides: Any) -> VisionTransformer:
    """A 2-block timm ``VisionTransformer`` on 32 px images (4x4 patches of 8 px, width 64, 10 classes).

    ``overrides`` replace or add constructor arguments, e.g. ``class_token=False, global_pool="avg"``,
    ``reg_tokens=2`` or ``dynamic_img_size=True``, so tests can cover timm's token layouts. The class
    is used directly (not ``timm.create_model``), so no pretrained config or hub lookup is involved.
    """
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {**TINY_VIT_KWARGS, **overrides}
    torch.manual_seed(seed)
    return VisionTransformer(**kwargs)


# ------------------------------------------------------------------------------------------ open_clip


def tiny_clip(seed: int = 0) -> open_clip.CLIP:
    """A tiny ``open_clip.CLIP`` (ViT image tower, open_clip text transformer, joint width 64).

    The text tower keeps CLIP's real vocabulary (49,408) and context (77), so the bundled OpenAI BPE
    tokenizer of :func:`clip_tokenizer` feeds it directly. Built with the class itself, not
    ``create_model``, so no model registry entry and no "No pretrained weights loaded" log.
    """
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(**_clip_cfg())


def tiny_custom_text_clip(seed: int = 0) -> open_clip.CustomTextCLIP:
    """The same tiny model as a ``open_clip.CustomTextCLIP`` (text tower under ``model.text``).

    With no ``hf_model_name`` in the text config, open_clip builds its own ``TextTransformer`` (not
    a Hugging Face model), so this is fully offline and takes the same tokenizer as :func:`tiny_clip`.
    It covers the other attribute layout adapters must handle: ``model.text.transformer`` instead
    of ``model.transformer``.
    """
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CustomTextCLIP(**_clip_cfg())


def clip_tokenizer() -> Any:
    """open_clip's tokenizer for ``ViT-B-32``: OpenAI's BPE, bundled in the wheel, so it works offline.

    Returns a ``SimpleTokenizer`` (sot 49406, eot 49407, pads with 0 to 77 tokens).
    """
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


def _clip_cfg() -> dict[str, Any]:
    """A deep copy of :data:`TINY_CLIP_CFG`, so the constructors can never mutate the constant."""
    return json.loads(json.dumps(TINY_CLIP_CFG))


# ---------------------------------------------------------------------------------- tiny CLIP tokenizer


def _tiny_clip_vocab() -> dict[str, int]:
    """The tiny CLIP BPE vocabulary: bytes, bytes + ``</w>``, the merged strings, then sot / eot.

    That is 256 + 256 + 5 + 2 = 519 tokens; every merge combines tokens already in the vocabulary,
    which the ``tokenizers`` BPE model requires.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols]
    for merge in TINY_MERGES:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def tiny_clip_tokenizer_files(directory: str | os.PathLike[str]) -> Path:
    """Write the tiny vocabulary as ``vocab.json`` and ``merges.txt`` into ``directory``; return it.

    These are the files a slow (transformers 4.x) ``CLIPTokenizer`` and
    ``CLIPTokenizer(vocab=path, merges=path)`` both read, so a test can hand a tokenizer folder to
    code that loads one from disk.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(
        json.dumps(_tiny_clip_vocab(), ensure_ascii=False), encoding="utf-8"
    )
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n", encoding="utf-8")
    return directory


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A ``transformers.CLIPTokenizer`` over the 519-token handwritten vocabulary, padding to 77.

    In transformers 5 ``CLIPTokenizer`` is the ``tokenizers``-backed class; in memory its ``merges``
    must be a list of pairs (a list of ``"a b"`` strings is rejected). ``model_max_length=77`` is
    passed because otherwise the pipelines pad prompts to a huge length.
    """
    from transformers import CLIPTokenizer

    merges = [tuple(merge.split(" ")) for merge in TINY_MERGES]
    return CLIPTokenizer(vocab=_tiny_clip_vocab(), merges=merges, model_max_length=CONTEXT_LENGTH)


# ---------------------------------------------------------------------------------- Stable Diffusion


def tiny_sd_components(seed: int = 0) -> dict[str, Any]:
    """The components of a tiny Stable Diffusion pipeline: unet, vae, text_encoder, tokenizer, scheduler.

    The UNet (1.1M parameters) has one cross-attention level and the VAE two levels (scale factor 2);
    the CLIP text encoder (hidden 32) uses the tiny tokenizer's ids. The scheduler is a
    ``DDIMScheduler`` with ``steps_offset=1`` and ``clip_sample=False``, which keeps the pipeline
    from rewriting its config with a deprecation warning; a training noise scheduler can be made with
    ``DDPMScheduler.from_config(components["scheduler"].config)``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    )
    text_config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tokenizer),
        max_position_embeddings=CONTEXT_LENGTH,
    )
    text_encoder = CLIPTextModel(text_config).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny ``StableDiffusionPipeline`` from :func:`tiny_sd_components`, without a safety checker.

    Runs 2-step inference at 32 px on CPU in well under a second.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **tiny_sd_components(seed),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd_pipeline(directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save :func:`tiny_sd_pipeline` with ``save_pretrained`` into ``directory`` and return the path.

    ``StableDiffusionPipeline.from_pretrained(directory, local_files_only=True)`` reloads it. The
    tokenizer folder also gets ``vocab.json`` / ``merges.txt`` (transformers 5 writes only
    ``tokenizer.json``), so older slow tokenizers can read it too.
    """
    directory = Path(directory)
    tiny_sd_pipeline(seed).save_pretrained(directory, safe_serialization=True)
    tiny_clip_tokenizer_files(directory / "tokenizer")
    return directory


def tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """The components of a tiny SDXL pipeline: a ``text_time`` UNet and two CLIP text encoders.

    The text encoders are 32 wide (the second with a projection, for the pooled embedding); the VAE
    and the tokenizers are the tiny SD ones; the scheduler is an ``EulerDiscreteScheduler``, as
    SDXL's. Keys: unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    )
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    config = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                  num_hidden_layers=5, vocab_size=len(tokenizer), max_position_embeddings=CONTEXT_LENGTH)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=32, **config)).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "scheduler": scheduler}


def tiny_sdxl_pipeline(seed: int = 0) -> Any:
    """A tiny ``StableDiffusionXLPipeline`` from :func:`tiny_sdxl_components` (no watermarker)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
