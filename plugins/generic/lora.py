"""LoRA (Hu et al., 2021) on any registered host, through peft.

The low-rank update ``W + (alpha / r) * B A`` is injected with peft's ``inject_adapter_in_model``,
the same entry point diffusers uses, so saved tensors follow peft's key conventions
(``<module>.lora_A.weight``). Targets are resolved by visionpeft's one matching rule (full-match
patterns) before peft sees them, so ``patch_embed.proj`` is never caught by a ``proj`` target.
A ``targets`` entry ``"@name"`` names one of the host's ``target_presets`` (e.g. ``"@unet_ff"`` on
Stable Diffusion), a group of patterns that counts as one: it must match something as a whole.
peft is imported only when a LoRA is attached.

With ``dora: true`` the update is DoRA's (Liu et al., ICML 2024), through peft's ``use_dora``:
``W' = m * (W + s B A) / ||W + s B A||`` per output row, with the magnitude ``m`` (one number per
output unit of each target, saved as ``<module>.lora_magnitude_vector.weight``) starting at
``||W||``, so the model is unchanged at attach. It merges exactly like LoRA. The merged-weight
training path (:mod:`visionpeft.generic.lora_fast`) does not apply to it: peft's forward runs. A
host that writes LoRA files for its users' tools (``Host.lora_export``: Stable Diffusion's diffusers
and kohya files) writes plain LoRA, so DoRA is refused there at attach (:meth:`LoRA.check_dora`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from visionpeft.config import MethodConfig, field
from visionpeft.errors import ConfigError
from visionpeft.generic import lora_fast
from visionpeft.head import attach_head, detach_head, head_modules, head_tensors, merge_head
from visionpeft.hosts import Host, find_host
from visionpeft.inject import find_modules, replace_module
from visionpeft.method import Method, RunInfo, attached_methods

LORA_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention)


@dataclasses.dataclass
class LoRAConfig(MethodConfig):
    """Hyper-parameters of LoRA; the defaults are PEFT's (r 8, alpha 8, no dropout)."""

    r: int = field(8, help="rank of the update", ge=1)
    alpha: float = field(8.0, help="scale numerator: the update is multiplied by alpha / r", gt=0)
    dropout: float = field(0.0, help="dropout on the LoRA branch's input", ge=0, lt=1)
    targets: list[str] | None = field(
        None, help="full-match patterns over module names, or '@preset' names of the host's target_presets; "
        "default: the host's LoRA targets"
    )
    init: Literal["kaiming", "gaussian"] = field(
        "kaiming", help="init of A (B is zero, so the model starts unchanged); 'gaussian' as diffusers"
    )
    train_head: bool = field(True, help="train a copy of the host's classification head, if it has one")
    dora: bool = field(
        False, help="DoRA: also learn a magnitude per output unit, W' = m (W + s B A) / ||W + s B A|| (peft use_dora)"
    )


def _strip_adapter(name: str, adapter_name: str) -> str | None:
    """``a.lora_A.<adapter>.weight`` → ``a.lora_A.weight``; ``None`` for other tensors."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i] == adapter_name and parts[i - 1].startswith("lora_"):
            return ".".join(parts[:i] + parts[i + 1 :])
    return None


def expand_presets(patterns: list[str], host: Host) -> list[str]:
    """``patterns`` with each ``"@name"`` replaced by the host's preset of that name, as one pattern.

    A preset's patterns are joined into one alternation, so a preset must match some module as a
    whole while one of its parts may match nothing in a given model (no ``conv_shortcut`` in
    some UNets). Raises :class:`ConfigError` for a preset the host does not have.
    """
    out = []
    for pattern in patterns:
        if not pattern.startswith("@"):
            out.append(pattern)
            continue
        preset = host.target_presets.get(pattern[1:])
        if preset is None:
            known = ", ".join(f"@{name}" for name in sorted(host.target_presets)) or "none"
            raise ConfigError(
                f"lora.targets: {pattern!r} is not a target preset of the host {host.family!r}; its presets: {known}"
            )
        out.append("|".join(f"(?:{p})" for p in preset))
    return out


def set_fast_path(model: nn.Module, enabled: bool) -> int:
    """Turn the merged-weight training path of the model's LoRA linear layers on or off; the layers changed.

    It is on after ``vp.attach``. The two give the same outputs and gradients to float rounding
    (:mod:`visionpeft.generic.lora_fast` says where the path applies); off, every layer runs peft's
    own ``forward``, for comparison or to rule the path out.
    """
    return lora_fast.enable(model) if enabled else lora_fast.disable(model)


class LoRA(Method):
    """Low-rank updates of the host's linear and convolution layers (peft implementation)."""

    name = "lora"
    domain = "core"
    description = "LoRA low-rank updates (through peft) on any host's linear/conv layers; mergeable"
    Config = LoRAConfig
    mergeable = True
    starts_as_identity = True
    _head: str | None = None

    def _targets(self, model: nn.Module) -> tuple[list[str], str | None]:
        host = find_host(model)
        patterns = self.config.targets if self.config.targets is not None else list(host.lora_targets)
        patterns = expand_presets(patterns, host)
        if not patterns:
            raise ConfigError(f"lora.targets: the host {host.family!r} has no default LoRA targets; give lora.targets "
                              "(full-match module-name patterns)")
        from peft.tuners.lora import LoraLayer

        names = find_modules(model, patterns)
        wrong = [n for n in names if not isinstance(model.get_submodule(n), (*LORA_LAYER_TYPES, LoraLayer))]
        if wrong:
            kinds = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in wrong[:4])
            raise ConfigError(
                f"lora.targets matched modules LoRA cannot adapt: {kinds}; target Linear, Conv or "
                "Embedding layers by their full names"
            )
        head = host.head if self.config.train_head else None
        if head is not None and any(n == head or n.startswith(head + ".") for n in names):
            raise ConfigError(f"lora.targets matched the head {head!r}, which is trained whole; exclude it")
        return names, head

    def check_dora(self, host: Host) -> None:
        """Refuse DoRA on a host whose LoRA files (``Host.lora_export``) cannot carry its magnitudes.

        Such a host writes files for other tools at the end of a run (Stable Diffusion: diffusers'
        ``pytorch_lora_weights.safetensors`` and kohya's format, both plain ``A``/``B`` pairs); a
        DoRA adapter would be exported wrong or not at all, so it is refused before training.
        """
        if self.config.dora and host.lora_export is not None:
            raise ConfigError(
                f"method.dora: the {host.family!r} host exports LoRA files for its tools (diffusers, kohya) that "
                "carry plain LoRA only, not DoRA's magnitudes; set method.dora: false"
            )

    def attach(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model

        self.check_dora(find_host(model))
        names, head = self._targets(model)
        self._head = head
        peft_config = LoraConfig(
            r=self.config.r,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules="(" + "|".join(re.escape(n) for n in names) + ")",
            init_lora_weights=True if self.config.init == "kaiming" else "gaussian",
            use_dora=self.config.dora,
        )
        with warnings.catch_warnings():
            # Several named adapters on one model are intended here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(peft_config, model, adapter_name=self.adapter_name)
        # peft activates only the newest adapter; every attached visionpeft adapter stays active.
        for layer in self._layers(model):
            layer.set_adapter(list(layer.lora_A.keys()))
        lora_fast.enable(model)
        for n, p in model.named_parameters():
            if _strip_adapter(n, self.adapter_name) is not None:
                p.requires_grad_(True)
        if head is not None:
            attach_head(model, head, self.adapter_name)
        return model

    def _layers(self, model: nn.Module) -> list[nn.Module]:
        from peft.tuners.lora import LoraLayer

        return [m for m in model.modules() if isinstance(m, LoraLayer) and self.adapter_name in m.lora_A]

    def _remove(self, model: nn.Module) -> None:
        layers = {id(m) for m in self._layers(model)}
        for name, module in list(model.named_modules()):
            if id(module) in layers:
                module.delete_adapter(self.adapter_name)
                if not module.lora_A:
                    replace_module(model, name, module.get_base_layer())
        # inject_adapter_in_model records its config on the model; leave no trace of it.
        configs = model.__dict__.get("peft_config", {})
        configs.pop(self.adapter_name, None)
        if not configs:
            model.__dict__.pop("peft_config", None)

    def detach(self, model: nn.Module) -> nn.Module:
        self._remove(model)
        if self._head is not None:
            detach_head(model, self._head, self.adapter_name)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        for layer in self._layers(model):
            layer.merge(adapter_names=[self.adapter_name])
            # The update now lives in the base weight; forget that peft merged it.
            layer.merged_adapters.remove(self.adapter_name)
        self._remove(model)
        if self._head is not None:
            merge_head(model, self._head, self.adapter_name)
        return model

    def train_modules(self, model: nn.Module) -> list[nn.Module] | None:
        if not find_host(model).frozen_backbone_eval:
            return None
        dropouts = [layer.lora_dropout[self.adapter_name] for layer in self._layers(model)]
        return dropouts + head_modules(model, self._head)

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tensors = {}
        for n, p in model.named_parameters():
            key = _strip_adapter(n, self.adapter_name)
            if key is not None:
                tensors[key.replace(".base_layer.", ".")] = p
        if self._head is not None:
            tensors.update(head_tensors(model, self._head, self.adapter_name))
        return tensors

    def export(self, model: nn.Module, output_dir: str | os.PathLike, run: RunInfo) -> None:
        """The LoRA files of the model family's tools, when its host writes them (``Host.lora_export``).

        With several LoRA adapters attached, each writes into a subfolder named after it.
        """
        host = find_host(model)
        if host is None or host.lora_export is None:
            return
        loras = [m for m in attached_methods(model) if isinstance(m, LoRA)]
        folder = Path(output_dir) if len(loras) == 1 else Path(output_dir) / self.adapter_name
        host.lora_export(model, folder, run, self.adapter_name)
