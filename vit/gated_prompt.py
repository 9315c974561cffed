"""LLaMA-Adapter's zero-init gated prompts (Zhang et al., ICLR 2024) in the top blocks of a timm ViT.

In each of the top ``layers`` blocks (reference ``more-methods.md`` §3.7), ``num_tokens`` learned
prompts ``T`` (``(K, D)``) are projected by that block's frozen ``qkv`` (bias included, through
whatever adapter wraps ``qkv``), giving prompt keys (through ``k_norm``, as the token keys) and
values. The real queries attend to them with a softmax of their own, scaled by a gate per head
that starts at zero, and the result is added to the heads' outputs before ``proj``::

    out = softmax(q K_tok^T / sqrt d) V_tok + g_head * softmax(q K_prompt^T / sqrt d) V_prompt

The prompts are not added to the sequence. The gates are peft ``adaption_prompt``'s zero-init
gate, one per head (later LLaMA-Adapter code; peft has one per layer); no tanh is applied to them
(whether the official code does is unverified, reference §6). The prompts start from N(0, 1), as
peft's. The attention mask and ``is_causal`` restrict the token keys only; every query sees every
prompt. ``attn_drop`` applies to the prompt attention as to the tokens'.

**Identity at attach, exactly**: the token attention runs timm's own operations (fused
``scaled_dot_product_attention`` or not, as the attention is set), and the branch adds
``0 * finite``, an exact zero; nothing is reordered, so the output is bit for bit the base model's.
At the first step the gates get a gradient (the prompt attention's output) and the prompts none
(it is multiplied by the zero gate); once a gate moves off zero, the prompts learn too.

On ViT-B/16, every block (``layers`` 12) and K = 10: 12 · 10 · 768 + 12 · 12 gates = 92,304
parameters (reference §3.7 counts 92,172 with one scalar gate per block), plus the head.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from visionpeft.config import MethodConfig, field
from visionpeft.errors import ConfigError, UnsupportedModelError
from visionpeft.vit import attention
from visionpeft.vit.surface import find_vit

MODULES_ATTR = "gated_prompts"


@dataclasses.dataclass
class GatedPromptConfig(MethodConfig):
    """How many top blocks get prompts, and how many prompts each."""

    layers: int | None = field(None, help="prompted blocks, counted from the top (default: every block)", ge=1)
    num_tokens: int = field(10, help="prompts per prompted block (K; LLaMA-Adapter uses 10)", ge=1)


class GatedPrompts(nn.Module):
    """Prompts ``(L, K, D)`` and per-head gates ``(L, H)`` (zero) of the top ``L`` blocks."""

    def __init__(self, layers: int, num_tokens: int, dim: int, heads: int, first: int, like: torch.Tensor) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.prompts = nn.Parameter(torch.randn(layers, num_tokens, dim, **kw))
        self.gates = nn.Parameter(torch.zeros(layers, heads, **kw))
        self.first = first

    def branch(self, index: int, attn: nn.Module, q: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s gated prompt attention for queries ``q`` ``(B, H, N, head_dim)`` after ``q_norm``."""
        j = index - self.first
        k, v = prompt_keys_values(attn, self.prompts[j].to(q.dtype))
        probs = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        return self.gates[j].to(q.dtype).view(1, -1, 1, 1) * (probs @ v)


def prompt_keys_values(attn: nn.Module, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt keys (after ``k_norm``) and values ``(H, K, head_dim)`` from the attention's own ``qkv``."""
    kv = attn.qkv(prompts).reshape(prompts.shape[0], 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    return attn.k_norm(kv[1]), kv[2]


class GatedPrompt(attention.AttentionMethod):
    """Zero-gated prompt attention in the top blocks of a timm ViT: an exact identity at attach."""

    name = "gated_prompt"
    description = "LLaMA-Adapter's zero-init gated prompts in the top blocks' attention (timm ViTs); + head"
    Config = GatedPromptConfig
    starts_as_identity = True

    def _module(self, model: nn.Module) -> GatedPrompts:
        return getattr(find_vit(model), MODULES_ATTR)[self.adapter_name]

    def _first(self, vit: nn.Module) -> int:
        depth, layers = len(vit.blocks), self.config.layers
        if layers is None:
            return 0
        if layers > depth:
            raise ConfigError(f"method.layers: {layers} is more than the model's {depth} blocks; use at most {depth}")
        return depth - layers

    def insert(self, model: nn.Module) -> None:
        vit = find_vit(model)
        attention.check_attention(vit)
        first = self._first(vit)
        shapes = {(a.attn_dim, a.num_heads) for a in
                  (attention.attention_site(vit, i).layer() for i in range(first, len(vit.blocks)))}
        if len(shapes) != 1:
            raise UnsupportedModelError(f"gated_prompt: the prompted blocks' attentions differ ({sorted(shapes)})")
        _, heads = shapes.pop()
        like = next(vit.blocks[0].parameters()).detach()
        module = GatedPrompts(len(vit.blocks) - first, self.config.num_tokens, vit.embed_dim, heads, first, like)
        if not hasattr(vit, MODULES_ATTR):
            setattr(vit, MODULES_ATTR, nn.ModuleDict())
        getattr(vit, MODULES_ATTR)[self.adapter_name] = module
        for i in range(first, len(vit.blocks)):
            # A bound method in a partial: a deep copy of the model points at the copy's module.
            attention.extend(vit, i).branches[self.adapter_name] = functools.partial(module.branch, i)

    def remove(self, model: nn.Module, merge: bool = False) -> None:
        vit = find_vit(model)
        module = self._module(model)
        for i in range(module.first, len(vit.blocks)):
            attention.extend(vit, i).branches.pop(self.adapter_name, None)
            attention.release(vit, i)
        modules = getattr(vit, MODULES_ATTR)
        del modules[self.adapter_name]
        if not len(modules):
            delattr(vit, MODULES_ATTR)

    def own_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"gated_prompt.{n}": p for n, p in self._module(model).named_parameters()}

    def own_modules(self, model: nn.Module) -> list[nn.Module]:
        return [self._module(model)]
