"""LoRA files the diffusion tools load: diffusers/peft format and kohya (ComfyUI, AUTOMATIC1111) format.

Both formats carry the same update ``W + (alpha / r) B A``; they differ in key names and in where
alpha lives:

* diffusers: ``pytorch_lora_weights.safetensors`` with peft keys under the component
  (``unet.<path>.lora_A.weight``, ``text_encoder.text_model.<path>.lora_B.weight``) and, in the
  safetensors header, ``lora_adapter_metadata``: the ``LoraConfig`` of each component under its
  prefix (``"unet.r"``, ``"unet.lora_alpha"``, ...), which ``pipe.load_lora_weights`` reads. Without
  it diffusers assumes ``alpha = r`` and a LoRA trained with alpha != r reloads wrong.
* kohya: ``lora_unet_*`` / ``lora_te_*`` (SDXL ``lora_te1_*`` / ``lora_te2_*``) keys with
  ``.lora_down.weight``, ``.lora_up.weight`` and the true ``.alpha``, plus ``ss_*`` metadata
  (``ss_network_module=networks.lora``, ``ss_network_dim``, ``ss_network_alpha``,
  ``ss_base_model_version``) that A1111 and Civitai show.

:class:`LoraWeights` is the format-neutral form every reader returns and every writer takes.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from visionpeft import tensorfiles
from visionpeft.diffusion import kohya
from visionpeft.errors import AdapterError
from visionpeft.files import atomic_write_bytes, read_safetensors_metadata

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B",
    ".lora.down.weight": "A", ".lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A", ".lora_linear_layer.up.weight": "B",
}


@dataclass
class LoraWeights:
    """One LoRA in neutral form: per module ``down`` (A) and ``up`` (B) weights and its alpha.

    Module names start with their component (``unet.``, ``text_encoder.``, ``text_encoder_2.``)
    and follow the component's module paths; text-encoder paths never carry ``text_model.``.
    """

    down: dict[str, torch.Tensor]
    up: dict[str, torch.Tensor]
    alphas: dict[str, float]
    is_sdxl: bool = False
    base_model_version: str = "sd_v1"
    extra_metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.down) != set(self.up) or set(self.down) != set(self.alphas):
            missing = sorted(set(self.down) ^ set(self.up) | set(self.down) ^ set(self.alphas))
            raise AdapterError(f"incomplete LoRA: modules without both weights and an alpha: {missing[:4]}")
        if not self.down:
            raise AdapterError("the LoRA has no modules: the file or adapter holds no lora_A/lora_B (or "
                               "lora_down/lora_up) weights; is it a LoRA file?")
        for module in self.down:
            if self.down[module].shape[0] != self.up[module].shape[1]:
                raise AdapterError(
                    f"LoRA module {module}: down {tuple(self.down[module].shape)} and up "
                    f"{tuple(self.up[module].shape)} do not share a rank"
                )

    @property
    def modules(self) -> list[str]:
        """The adapted modules, sorted."""
        return sorted(self.down)

    def rank(self, module: str) -> int:
        """The rank of ``module``'s update."""
        return int(self.down[module].shape[0])

    def delta(self, module: str) -> torch.Tensor:
        """The weight update ``alpha / r * up @ down`` of a linear module (for tests and checks)."""
        down, up = self.down[module].flatten(1).double(), self.up[module].flatten(1).double()
        return (self.alphas[module] / self.rank(module)) * (up @ down)


# --- from a model or a visionpeft adapter ---------------------------------------------------------


def base_model_version(model: nn.Module) -> str:
    """kohya's ``ss_base_model_version`` of a Stable Diffusion model: ``sd_v1``, ``sd_v2`` or ``sdxl_base_v1-0``."""
    if getattr(model, "is_sdxl", False):
        return "sdxl_base_v1-0"
    hidden = getattr(getattr(model.text_encoder, "config", None), "hidden_size", 768)
    return "sd_v2" if hidden == 1024 else "sd_v1"


def _lora_method(model: nn.Module, adapter_name: str | None) -> Any:
    from visionpeft.method import get_state

    state = get_state(model)
    loras = {name: a.method for name, a in (state.adapters.items() if state else []) if a.method.name == "lora"}
    if not loras:
        raise AdapterError("the model carries no LoRA adapter (attach one with vp.attach(model, 'lora', ...))")
    if adapter_name is None:
        if len(loras) > 1:
            raise AdapterError(f"the model carries several LoRA adapters {sorted(loras)}; pass adapter_name=")
        adapter_name = next(iter(loras))
    if adapter_name not in loras:
        raise AdapterError(f"no LoRA adapter named {adapter_name!r}; the model has {sorted(loras)}")
    return loras[adapter_name]


def from_tensors(
    tensors: dict[str, torch.Tensor], r: int, alpha: float, *, is_sdxl: bool, version: str
) -> LoraWeights:
    """Neutral form of peft-style tensors ``<module>.lora_A.weight`` / ``.lora_B.weight`` with one alpha.

    ``r`` is checked against every module's rank.
    """
    down: dict[str, torch.Tensor] = {}
    up: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        for suffix, which in ((".lora_A.weight", down), (".lora_B.weight", up)):
            if key.endswith(suffix):
                which[_canonical(key[: -len(suffix)])] = value.detach().to("cpu").contiguous()
                break
        else:
            if "lora_magnitude_vector" in key:
                # lora.check_dora refuses DoRA on this host at attach; this catches tensors from elsewhere.
                raise AdapterError(f"{key!r} is a DoRA magnitude: the diffusers and kohya files written here carry "
                                   "plain LoRA only; train with method.dora: false")
            raise AdapterError(f"{key!r} is not a LoRA weight (<module>.lora_A.weight or .lora_B.weight)")
    wrong = [m for m, t in down.items() if t.shape[0] != r]
    if wrong:
        raise AdapterError(f"LoRA modules {wrong[:3]} have rank {down[wrong[0]].shape[0]}, not r={r}")
    return LoraWeights(down, up, {m: float(alpha) for m in down}, is_sdxl=is_sdxl, base_model_version=version)


def from_model(model: nn.Module, adapter_name: str | None = None) -> LoraWeights:
    """The attached (unmerged) LoRA of a :class:`StableDiffusionModel` in neutral form."""
    method = _lora_method(model, adapter_name)
    tensors = method.trained_tensors(model)
    return from_tensors(tensors, method.config.r, method.config.alpha, is_sdxl=bool(model.is_sdxl),
                        version=base_model_version(model))


def from_adapter_dir(directory: str | os.PathLike) -> LoraWeights:
    """The LoRA of a visionpeft adapter folder (``vp.save``) trained on a Stable Diffusion model."""
    from visionpeft.files import read_adapter

    payload, tensors = read_adapter(directory)
    if payload["method"] != "lora":
        raise AdapterError(f"{directory} holds a {payload['method']!r} adapter, not a LoRA")
    base = payload["base_model"]
    if base.get("family") != "diffusers.StableDiffusion":
        raise AdapterError(
            f"{directory} is a LoRA of a {base.get('family')!r} model; diffusers and kohya files are for Stable "
            "Diffusion LoRAs"
        )
    params = base.get("parameters", {})
    is_sdxl = any(name.startswith("text_encoder_2.") for name in params)
    hidden = next((shape[-1] for name, shape in params.items() if name.startswith("text_encoder.")
                   and name.endswith("token_embedding.weight")), 768)
    version = "sdxl_base_v1-0" if is_sdxl else ("sd_v2" if hidden == 1024 else "sd_v1")
    config = payload["config"]
    return from_tensors(tensors, int(config["r"]), float(config["alpha"]), is_sdxl=is_sdxl, version=version)


def _canonical(module: str) -> str:
    component, _, path = module.partition(".")
    if component.startswith("text_encoder"):
        path = path.removeprefix("text_model.")
    return f"{component}.{path}"


# --- diffusers format -----------------------------------------------------------------------------


def _most_common(values: dict[str, Any]) -> Any:
    return collections.Counter(values.values()).most_common(1)[0][0]


def _component_metadata(weights: LoraWeights, component: str) -> dict[str, Any] | None:
    modules = [m for m in weights.modules if m.split(".", 1)[0] == component]
    if not modules:
        return None
    local = {m: m.split(".", 1)[1] for m in modules}
    ranks = {local[m]: weights.rank(m) for m in modules}
    alphas = {local[m]: weights.alphas[m] for m in modules}
    r, alpha = _most_common(ranks), _most_common(alphas)
    # Full module paths: peft matches rank/alpha patterns and targets as suffixes of module names,
    # and a text-encoder path without text_model. is a suffix in transformers 4 and 5 alike.
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(local.values()),
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
        "use_dora": False,
        "lora_bias": False,
    }


def diffusers_state_dict(weights: LoraWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of the diffusers file for ``weights``.

    Text-encoder keys get ``text_model.``, which diffusers strips again for transformers 5's
    encoders and older transformers need.
    """
    tensors: dict[str, torch.Tensor] = {}
    for module in weights.modules:
        component, _, path = module.partition(".")
        if component.startswith("text_encoder"):
            path = "text_model." + path
        tensors[f"{component}.{path}.lora_A.weight"] = weights.down[module]
        tensors[f"{component}.{path}.lora_B.weight"] = weights.up[module]
    adapter_metadata: dict[str, Any] = {}
    for component in COMPONENTS:
        meta = _component_metadata(weights, component)
        if meta is not None:
            adapter_metadata.update({f"{component}.{k}": v for k, v in meta.items()})
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(adapter_metadata, indent=2, sort_keys=True)}
    return tensors, metadata


def save_diffusers(weights: LoraWeights, path: str | os.PathLike) -> Path:
    """Write ``weights`` as a diffusers LoRA file (a folder gets :data:`DIFFUSERS_WEIGHT_NAME`), atomically.

    ``pipe.load_lora_weights(folder)`` (or ``(folder, weight_name=...)``) reads it.
    """
    path = _file_path(path, DIFFUSERS_WEIGHT_NAME)
    tensors, metadata = diffusers_state_dict(weights)
    atomic_write_bytes(path, safetensors_save(tensors, metadata=metadata))
    return path


def from_diffusers_state_dict(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *, is_sdxl: bool | None = None
) -> LoraWeights:
    """Neutral form of a diffusers LoRA state dict: peft keys, or the older ``lora.down`` naming.

    The alphas come from ``lora_adapter_metadata`` when present (``lora_alpha`` and
    ``alpha_pattern`` of each component), else ``alpha = r`` as diffusers assumes.
    """
    down: dict[str, torch.Tensor] = {}
    up: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if "lora_magnitude_vector" in key:
            raise AdapterError(
                f"{key!r} is a DoRA magnitude vector: DoRA LoRA files are not supported here (only plain LoRA "
                "down/up weights convert); load a DoRA file with diffusers' pipe.load_lora_weights(path) directly"
            )
        for suffix, which in _DIFFUSERS_SUFFIXES.items():
            if key.endswith(suffix):
                module = _canonical(key[: -len(suffix)])
                if module.split(".", 1)[0] not in COMPONENTS:
                    raise AdapterError(
                        f"{key!r}: a diffusers LoRA key starts with its component ({', '.join(COMPONENTS)})"
                    )
                (down if which == "A" else up)[module] = value
                break
        else:
            raise AdapterError(
                f"{key!r} is not a diffusers LoRA key (<component>.<module>.lora_A.weight / .lora_B.weight or "
                ".lora.down.weight / .lora.up.weight); is it a kohya file (lora_unet_ keys)?"
            )
    raw = (metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    adapter_metadata = json.loads(raw) if raw else {}
    alphas = {}
    for module in down:
        component, _, path = module.partition(".")
        alpha = adapter_metadata.get(f"{component}.lora_alpha")
        pattern = adapter_metadata.get(f"{component}.alpha_pattern") or {}
        for key, value in pattern.items():
            if path == key.removeprefix("text_model.") or path.endswith("." + key.removeprefix("text_model.")):
                alpha = value
        alphas[module] = float(alpha) if alpha is not None else float(down[module].shape[0])
    sdxl = any(m.startswith("text_encoder_2.") for m in down) if is_sdxl is None else is_sdxl
    return LoraWeights(down, up, alphas, is_sdxl=sdxl, base_model_version="sdxl_base_v1-0" if sdxl else "sd_v1")


# --- kohya format ---------------------------------------------------------------------------------


def kohya_state_dict(weights: LoraWeights, **metadata: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and ``ss_*`` metadata of the kohya file for ``weights``; ``metadata`` adds ``ss_*`` keys."""
    tensors: dict[str, torch.Tensor] = {}
    for module in weights.modules:
        name = kohya.module_to_kohya(module, weights.is_sdxl)
        tensors[f"{name}.lora_down.weight"] = weights.down[module]
        tensors[f"{name}.lora_up.weight"] = weights.up[module]
        tensors[f"{name}.alpha"] = torch.tensor(weights.alphas[module], dtype=torch.float32)
    ranks = {m: weights.rank(m) for m in weights.modules}
    alphas = dict(weights.alphas)
    conv = [m for m in weights.modules if weights.down[m].ndim == 4 and weights.down[m].shape[-1] > 1]
    linear = [m for m in weights.modules if m not in conv]
    dim = _most_common({m: ranks[m] for m in linear}) if linear else _most_common(ranks)
    alpha = _most_common({m: alphas[m] for m in linear}) if linear else _most_common(alphas)
    out = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": _number(alpha),
        "ss_base_model_version": weights.base_model_version,
        "ss_v2": str(weights.base_model_version == "sd_v2"),
        "ss_training_comment": "trained with visionpeft",
    }
    text = [m for m in weights.modules if m.startswith("text_encoder")]
    out["ss_network_train_unet_only"] = str(not text)
    out["ss_network_train_text_encoder_only"] = str(all(m.startswith("text_encoder") for m in weights.modules))
    if conv:
        # kohya's LoCon: 3x3 convolutions get their own dim/alpha in network_args.
        out["ss_network_args"] = json.dumps({
            "conv_dim": str(_most_common({m: ranks[m] for m in conv})),
            "conv_alpha": _number(_most_common({m: alphas[m] for m in conv})),
        })
    out.update(weights.extra_metadata)
    out.update(metadata)
    return tensors, out


def save_kohya(weights: LoraWeights, path: str | os.PathLike, **metadata: str) -> Path:
    """Write ``weights`` as a kohya LoRA file (a folder gets :data:`KOHYA_WEIGHT_NAME`), atomically.

    ComfyUI's and A1111's LoRA loaders and ``pipe.load_lora_weights(folder, weight_name=...)`` read it.
    """
    path = _file_path(path, KOHYA_WEIGHT_NAME)
    tensors, meta = kohya_state_dict(weights, **metadata)
    atomic_write_bytes(path, safetensors_save(tensors, metadata=meta))
    return path


def from_kohya_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> LoraWeights:
    """Neutral form of a kohya LoRA; a module without ``.alpha`` has ``alpha = rank`` (ComfyUI's rule)."""
    down: dict[str, torch.Tensor] = {}
    up: dict[str, torch.Tensor] = {}
    alpha_values: dict[str, float] = {}
    for key, value in tensors.items():
        name, rest = kohya.split_kohya_key(key)
        module = kohya.kohya_to_module(name)
        if rest == "lora_down.weight":
            down[module] = value
        elif rest == "lora_up.weight":
            up[module] = value
        elif rest == "alpha":
            alpha_values[module] = float(value.item())
        else:
            raise AdapterError(
                f"{key!r}: only plain LoRA modules (lora_down, lora_up, alpha) convert; LyCORIS (LoHa, LoKr, "
                "lora_mid) and DoRA keys are not supported"
            )
    alphas = {m: alpha_values.get(m, float(down[m].shape[0])) for m in down}
    meta = metadata or {}
    is_sdxl = any(k.startswith(("lora_te1_", "lora_te2_")) for k in tensors) or meta.get(
        "ss_base_model_version", "").startswith("sdxl")
    version = meta.get("ss_base_model_version") or ("sdxl_base_v1-0" if is_sdxl else "sd_v1")
    return LoraWeights(down, up, alphas, is_sdxl=is_sdxl, base_model_version=version)


# --- files ----------------------------------------------------------------------------------------


def read_lora_file(path: str | os.PathLike) -> LoraWeights:
    """Read a diffusers or kohya LoRA ``.safetensors`` file, or a visionpeft LoRA adapter folder.

    A folder is a visionpeft adapter (``adapter_config.json``) or holds
    :data:`DIFFUSERS_WEIGHT_NAME`. The format of a file is told from its keys.
    """
    from visionpeft.files import CONFIG_NAME

    path = Path(path)
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return from_adapter_dir(path)
        if (path / DIFFUSERS_WEIGHT_NAME).is_file():
            path = path / DIFFUSERS_WEIGHT_NAME
        else:
            raise AdapterError(
                f"{path} holds neither a visionpeft adapter ({CONFIG_NAME}) nor {DIFFUSERS_WEIGHT_NAME}; give the "
                "run's adapter/ folder or a LoRA .safetensors file"
            )
    if not path.is_file():
        raise AdapterError(f"{path} does not exist")
    metadata = read_safetensors_metadata(path)
    tensors = tensorfiles.read_safetensors(path, error=AdapterError, fix="export or download the LoRA file again")
    if kohya.is_kohya_state_dict(list(tensors)):
        return from_kohya_state_dict(tensors, metadata)
    return from_diffusers_state_dict(tensors, metadata)


def _file_path(path: str | os.PathLike, default_name: str) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / default_name
    return path


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def export_lora(model: nn.Module, output_dir: str | os.PathLike, adapter_name: str | None = None,
                **metadata: str) -> dict[str, Path]:
    """Write the model's LoRA in both formats into ``output_dir``; return ``{"diffusers": path, "kohya": path}``.

    ``output_dir/pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(output_dir)``) and
    ``output_dir/lora_kohya.safetensors`` (ComfyUI, A1111). ``metadata`` adds ``ss_*`` keys to the
    kohya file.
    """
    weights = from_model(model, adapter_name)
    output_dir = Path(output_dir)
    return {
        "diffusers": save_diffusers(weights, output_dir / DIFFUSERS_WEIGHT_NAME),
        "kohya": save_kohya(weights, output_dir / KOHYA_WEIGHT_NAME, **metadata),
    }
