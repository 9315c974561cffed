"""Prefix tuning (Li and Liang, ACL 2021) in the attention of every block of a timm ViT.

Per block, ``P`` learned keys and values (reference ``more-methods.md`` §3.6) are put before the
tokens' keys and values: ``attn(Q, [P_k; K], [P_v; V])``. The sequence and the outputs keep their
length, so nothing is stripped before pooling (unlike VPT). Prefixes live in ``qkv``'s output space
and go through the attention's ``k_norm`` like the token keys (:mod:`visionpeft.vit.attention`).
On ViT-B/16 the flat prefixes are 12 · 2 · P · 768 parameters: 184,320 for P = 10, plus the head.

The model is **not** the base model at attach, whatever the init: each query's attention mass
splits between the prefixes and the tokens, ``(1 - lambda) Attn(Q, K, V) + lambda Attn(Q, P_k, P_v)``
with ``lambda = sum exp(q P_k / sqrt d) / (sum exp(q P_k / sqrt d) + sum exp(q K / sqrt d))``. Even
zero prefixes (keys and values) give ``lambda = P / (P + sum exp(q K / sqrt d)) > 0``, so they scale
the token attention down by ``1 - lambda``. The flat prefixes start from N(0, 0.02), small next to
the keys of a LayerNorm-ed input.

``reparam: true`` is the original's reparametrisation (peft's ``PrefixEncoder`` with
``prefix_projection``, adapter-hub's ``flat: false``): the prefixes of every block are the output of
``Embedding(P, D) → Linear(D, reparam_hidden) → tanh → Linear(reparam_hidden, blocks · 2 · D)``,
512 hidden units as adapter-hub (9,857,024 parameters on ViT-B/16 with P = 10). Only that MLP's
output is needed once trained: :func:`fold_prefixes` evaluates it once and puts flat prefixes in its
place (the adapter becomes a ``reparam: false`` one, which ``vp.save`` then writes), and at the end
of a run :meth:`PrefixTuning.export` writes that folded adapter as ``adapter_folded/`` beside
``adapter/``. Prefix tuning is not merged into the base weights (``vp.merge`` refuses it).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import torch
from torch import nn

from visionpeft import files
from visionpeft.config import MethodConfig, field
from visionpeft.errors import AdapterError, UnsupportedModelError
from visionpeft.method import RunInfo, get_state
from visionpeft.vit import attention
from visionpeft.vit.surface import find_vit

MODULES_ATTR = "prefix_tuning"
FOLDED_DIR = "adapter_folded"


@dataclasses.dataclass
class PrefixConfig(MethodConfig):
    """The prefix length and the optional reparametrisation MLP of the original."""

    num_tokens: int = field(10, help="prefix keys and values per block (P)", ge=1)
    reparam: bool = field(False, help="compute the prefixes with an MLP while training (foldable into flat ones)")
    reparam_hidden: int = field(512, help="hidden width of the reparametrisation MLP (adapter-hub's 512)", ge=1)


class FlatPrefixes(nn.Module):
    """Prefixes as one tensor ``(blocks, 2, P, attn_dim)``: keys at index 0, values at 1."""

    def __init__(self, blocks: int, num_tokens: int, dim: int, like: torch.Tensor) -> None:
        super().__init__()
        self.prefixes = nn.Parameter(torch.empty(blocks, 2, num_tokens, dim, device=like.device, dtype=like.dtype))
        nn.init.normal_(self.prefixes, std=0.02)

    def block(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(P, attn_dim)`` of block ``index``."""
        return self.prefixes[index, 0], self.prefixes[index, 1]


class ReparamPrefixes(nn.Module):
    """Prefixes from ``Embedding → Linear → tanh → Linear``; each block computes its own slice of the last Linear."""

    def __init__(self, blocks: int, num_tokens: int, dim: int, hidden: int, like: torch.Tensor) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.embedding = nn.Embedding(num_tokens, dim, **kw)
        self.down = nn.Linear(dim, hidden, **kw)
        self.up = nn.Linear(hidden, blocks * 2 * dim, **kw)
        self.dim = dim

    def block(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(P, attn_dim)`` of block ``index``: rows of the last Linear for that block only."""
        hidden = torch.tanh(self.down(self.embedding.weight))
        rows = slice(index * 2 * self.dim, (index + 1) * 2 * self.dim)
        out = nn.functional.linear(hidden, self.up.weight[rows], self.up.bias[rows])
        return out[:, : self.dim], out[:, self.dim :]

    def fold(self) -> FlatPrefixes:
        """Flat prefixes equal to this MLP's output (computed once, the same way the forward does)."""
        blocks = self.up.out_features // (2 * self.dim)
        with torch.no_grad():
            values = torch.stack([torch.stack(self.block(i)) for i in range(blocks)])
        flat = FlatPrefixes(blocks, values.shape[2], self.dim, values)
        with torch.no_grad():
            flat.prefixes.copy_(values)
        return flat


def prefix_modules(vit: nn.Module) -> nn.ModuleDict:
    """The prefix modules of the adapters attached to ``vit``, by adapter name (created if missing)."""
    if not hasattr(vit, MODULES_ATTR):
        setattr(vit, MODULES_ATTR, nn.ModuleDict())
    return getattr(vit, MODULES_ATTR)


class PrefixTuning(attention.AttentionMethod):
    """Learned key and value prefixes in every attention of a timm ViT."""

    name = "prefix"
    description = "prefix tuning: learned keys and values before the tokens' in each attention (timm ViTs); + head"
    Config = PrefixConfig
    starts_as_identity = False

    def _module(self, model: nn.Module) -> FlatPrefixes | ReparamPrefixes:
        return getattr(find_vit(model), MODULES_ATTR)[self.adapter_name]

    def _width(self, vit: nn.Module) -> int:
        widths = {attention.attention_site(vit, i).layer().attn_dim for i in range(len(vit.blocks))}
        if len(widths) != 1:
            raise UnsupportedModelError(f"prefix: the blocks' attentions differ in width ({sorted(widths)})")
        return widths.pop()

    def insert(self, model: nn.Module) -> None:
        vit = find_vit(model)
        attention.check_attention(vit)
        cfg, blocks, dim = self.config, len(vit.blocks), self._width(vit)
        like = next(vit.blocks[0].parameters()).detach()
        if cfg.reparam:
            module = ReparamPrefixes(blocks, cfg.num_tokens, dim, cfg.reparam_hidden, like)
        else:
            module = FlatPrefixes(blocks, cfg.num_tokens, dim, like)
        prefix_modules(vit)[self.adapter_name] = module
        self._connect(vit, module)

    def _connect(self, vit: nn.Module, module: nn.Module) -> None:
        # Bound methods in partials, so that a deep copy of the model points at the copy's module.
        for i in range(len(vit.blocks)):
            attention.extend(vit, i).prefixes[self.adapter_name] = functools.partial(module.block, i)

    def remove(self, model: nn.Module, merge: bool = False) -> None:
        vit = find_vit(model)
        for i in range(len(vit.blocks)):
            attention.extend(vit, i).prefixes.pop(self.adapter_name, None)
            attention.release(vit, i)
        modules = prefix_modules(vit)
        del modules[self.adapter_name]
        if not len(modules):
            delattr(vit, MODULES_ATTR)

    def own_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"prefix.{n}": p for n, p in self._module(model).named_parameters()}

    def own_modules(self, model: nn.Module) -> list[nn.Module]:
        return [self._module(model)]

    def fold(self, model: nn.Module) -> None:
        """Replace the reparametrisation MLP by the flat prefixes it computes; the config becomes ``reparam: false``.

        Changes the model in place; the outputs stay the same bit for bit. An optimizer built
        before holds the MLP's tensors, so fold after training.
        """
        module = self._module(model)
        if not isinstance(module, ReparamPrefixes):
            raise AdapterError(f"prefix adapter {self.adapter_name!r} has no reparametrisation MLP to fold")
        vit = find_vit(model)
        flat = module.fold()
        prefix_modules(vit)[self.adapter_name] = flat
        self._connect(vit, flat)
        self.config = dataclasses.replace(self.config, reparam=False)

    def folded_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors of this adapter with its prefixes folded (what ``reparam: false`` saves), model unchanged."""
        tensors = {k: v for k, v in self.trained_tensors(model).items() if not k.startswith("prefix.")}
        module = self._module(model)
        flat = module.fold() if isinstance(module, ReparamPrefixes) else module
        tensors["prefix.prefixes"] = flat.prefixes.detach()
        return tensors

    def export(self, model: nn.Module, output_dir: str | os.PathLike, run: RunInfo) -> None:
        """With ``reparam: true``, the folded adapter (flat prefixes, no MLP) as ``adapter_folded/``.

        It loads like any adapter (``vp.load(model, "adapter_folded")``) and computes the same
        outputs as the trained one with a fraction of its tensors.
        """
        if not self.config.reparam:
            return
        state = get_state(model)
        files.write_adapter(
            Path(output_dir) / FOLDED_DIR,
            method=self.name,
            adapter_name=self.adapter_name,
            config=dataclasses.replace(self.config, reparam=False).to_dict(),
            base=state.base,
            tensors=self.folded_tensors(model),
        )


def fold_prefixes(model: nn.Module, name: str = "default") -> None:
    """Fold the reparametrisation MLP of prefix adapter ``name`` into flat prefixes, in place (see module doc)."""
    state = get_state(model)
    attachment = state.adapters.get(name) if state is not None else None
    if attachment is None or not isinstance(attachment.method, PrefixTuning):
        raise AdapterError(f"no prefix adapter named {name!r} is attached to this model")
    attachment.method.fold(model)
