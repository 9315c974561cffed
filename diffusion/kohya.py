"""kohya / A1111 LoRA keys: conversion between kohya's flat names and module paths.

kohya's sd-scripts (and ComfyUI, AUTOMATIC1111, Civitai) name a LoRA module by its path with dots
turned into underscores under a prefix: ``lora_unet_`` for the UNet, ``lora_te_`` for the SD 1.x/2.x
text encoder and ``lora_te1_`` / ``lora_te2_`` for SDXL's two. Each module has
``.lora_down.weight`` (peft's ``lora_A``), ``.lora_up.weight`` (``lora_B``) and a scalar ``.alpha``:
the update is ``up @ down * alpha / rank``. A file without ``.alpha`` means ``alpha = rank`` to
diffusers and ComfyUI, so the true alpha is always written.

Text-encoder names carry ``text_model_`` (A1111's and ComfyUI's key maps require it), which
transformers 5's flattened ``CLIPTextModel`` no longer has in its module paths; it is inserted on
the way out and removed on the way in. Underscores inside module names (``down_blocks``,
``to_out``, ``self_attn``, ...) are restored from the vocabulary of diffusers' and transformers'
module names in :data:`COMPOUND_NAMES`.
"""

from __future__ import annotations

from visionpeft.errors import AdapterError

#: kohya prefix of each component, for SD 1.x/2.x and for SDXL
PREFIXES_SD = {"unet": "lora_unet", "text_encoder": "lora_te"}
PREFIXES_SDXL = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")

#: module names that contain underscores, in the UNet (diffusers) and the CLIP text encoders (transformers)
COMPOUND_NAMES = frozenset({
    "down_blocks", "mid_block", "up_blocks", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "add_k_proj", "add_v_proj", "add_q_proj",
    "to_add_out", "time_embedding", "linear_1", "linear_2", "conv_in", "conv_out", "conv_norm_out",
    "add_embedding", "class_embedding", "encoder_hid_proj", "text_model", "self_attn", "q_proj", "k_proj",
    "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "text_projection",
    "token_embedding", "position_embedding",
})
_MAX_COMPOUND = max(name.count("_") + 1 for name in COMPOUND_NAMES)
#: module names without underscores in the same modules; with :data:`COMPOUND_NAMES`, every name a path may hold
SIMPLE_NAMES = frozenset({
    "act", "attentions", "attn1", "attn2", "conv", "conv1", "conv2", "downsamplers", "embeddings", "encoder",
    "fc1", "fc2", "ff", "layers", "mlp", "net", "norm", "norm1", "norm2", "norm3", "proj", "resnets", "upsamplers",
})
#: the first names of the original (SGM) SDXL UNet, which sd-scripts' SDXL files use instead of diffusers'
SGM_UNET_NAMES = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")


def kohya_prefixes(is_sdxl: bool) -> dict[str, str]:
    """The kohya prefix of each component (``unet``, ``text_encoder``, ``text_encoder_2``)."""
    return PREFIXES_SDXL if is_sdxl else PREFIXES_SD


def module_to_kohya(module: str, is_sdxl: bool) -> str:
    """``unet.down_blocks.0.attentions.0...to_q`` → ``lora_unet_down_blocks_0_attentions_0_..._to_q``.

    ``module`` starts with its component (``unet.``, ``text_encoder.``, ``text_encoder_2.``).
    """
    component, _, path = module.partition(".")
    prefixes = kohya_prefixes(is_sdxl)
    if component not in prefixes or not path:
        raise AdapterError(
            f"LoRA module {module!r} is not in a component kohya names ({sorted(prefixes)}); only the UNet's and "
            "the text encoders' LoRA layers can be written in kohya format"
        )
    if component.startswith("text_encoder") and not path.startswith("text_model."):
        path = "text_model." + path
    return f"{prefixes[component]}_{path.replace('.', '_')}"


def kohya_to_module(name: str) -> str:
    """``lora_unet_down_blocks_0_..._to_out_0`` → ``unet.down_blocks.0....to_out.0`` (the inverse).

    The text encoders' ``text_model.`` is dropped (module paths of transformers 5). Raises
    :class:`AdapterError` for a name without a kohya prefix, for the SGM UNet names of
    sd-scripts' SDXL files (``input_blocks``, ``middle_block``, ``output_blocks``) and for a name
    part that is no diffusers / transformers module name (rather than return a path to nothing).
    """
    for prefix, component in (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                              ("lora_te_", "text_encoder")):
        if name.startswith(prefix):
            flat = name[len(prefix):]
            if component == "unet" and flat.startswith(SGM_UNET_NAMES):
                raise AdapterError(
                    f"kohya LoRA module {name!r} uses the original SDXL (SGM) UNet names (input_blocks, middle_block, "
                    "output_blocks) of sd-scripts' SDXL files, which this converter does not map to diffusers "
                    "modules; load such a file with diffusers' pipe.load_lora_weights(path) directly"
                )
            path = _unflatten(flat)
            unknown = [s for s in path.split(".") if not s.isdigit() and s not in COMPOUND_NAMES | SIMPLE_NAMES]
            if unknown:
                raise AdapterError(
                    f"kohya LoRA module {name!r}: {unknown[0]!r} is not a diffusers UNet or CLIP text-encoder module "
                    "name, so the module it targets cannot be resolved; this converter reads kohya files named "
                    "after diffusers' modules; load other files with diffusers' pipe.load_lora_weights(path)"
                )
            if component.startswith("text_encoder"):
                path = path.removeprefix("text_model.")
            return f"{component}.{path}"
    raise AdapterError(
        f"{name!r} is not a kohya LoRA module name (expected one of the prefixes {list(KOHYA_PREFIXES)})"
    )


def _unflatten(flat: str) -> str:
    """Underscores back to dots, keeping the underscores of the names in :data:`COMPOUND_NAMES`."""
    parts = flat.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for width in range(min(_MAX_COMPOUND, len(parts) - i), 0, -1):
            candidate = "_".join(parts[i : i + width])
            if width == 1 or candidate in COMPOUND_NAMES:
                out.append(candidate)
                i += width
                break
    return ".".join(out)


def split_kohya_key(key: str) -> tuple[str, str]:
    """``<name>.lora_down.weight`` → ``(<name>, "lora_down.weight")``; the part after the first dot."""
    name, sep, rest = key.partition(".")
    if not sep:
        raise AdapterError(f"{key!r} is not a kohya LoRA key (<module>.lora_down.weight, .lora_up.weight, .alpha)")
    return name, rest


def is_kohya_state_dict(keys: list[str] | set[str]) -> bool:
    """Whether every key has a kohya prefix, the test diffusers' loader uses."""
    return bool(keys) and all(k.startswith(KOHYA_PREFIXES) for k in keys)
