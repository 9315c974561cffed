"""timm's ``Attention`` with extra keys and values and with gated side branches, for several adapters.

Prefix tuning (:mod:`visionpeft.vit.prefix`) attends over ``[prefix keys; token keys]`` and
zero-init gated prompts (:mod:`visionpeft.vit.gated_prompt`) add a separately softmaxed, gated
attention over prompt keys; both change what happens between timm's ``qkv`` and ``proj``, which no
wrapper of a single layer can reach. :class:`ExtendedAttention` takes the attention's place (a
:class:`~visionpeft.vit.sites.LayerWrapper` whose ``base`` is the timm ``Attention``) and re-states
``Attention.forward`` of timm 1.0 (``q_norm`` / ``k_norm``, ``attn_drop``, ``fused_attn``, the
``attn_mask`` and ``is_causal`` arguments, the output norm and gate, ``proj``) with two hooks:

* ``prefixes``: per adapter, a callable returning keys and values ``(P, attn_dim)`` in ``qkv``'s
  output space; they are split into heads and put before the token keys and values, and go through
  ``k_norm`` like the token keys (the convention chosen here). The attention mask is widened so
  that every query sees every prefix; a causal mask stays causal over the tokens.
* ``branches``: per adapter, a callable ``(attention, q) -> (B, H, N, head_dim)`` whose result is
  added to the heads' outputs, before the output norm, gate and ``proj``.

With no prefix the token attention runs exactly timm's operations, so a branch that adds an exact
zero leaves the output bit for bit unchanged. One wrapper serves every adapter of the attention;
it leaves when the last one does. It sits directly over the timm ``Attention``, under any wrapper
of the whole attention (Houlsby's adapter), so that those keep working on its output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from visionpeft.errors import UnsupportedModelError
from visionpeft.vit.base import VitMethod
from visionpeft.vit.sites import LayerWrapper, Site, block_site
from visionpeft.vit.surface import SUPPORTED

#: ``() -> (keys, values)``, each ``(P, attn_dim)``.
PrefixSource = Callable[[], tuple[torch.Tensor, torch.Tensor]]
#: ``(attention, q) -> addition to the heads' outputs``, ``q`` being ``(B, H, N, head_dim)`` after ``q_norm``.
Branch = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _timm_attention() -> type:
    from timm.layers.attention import Attention

    return Attention


class ExtendedAttention(LayerWrapper):
    """A timm ``Attention`` with the prefixes and branches of the adapters attached to it."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        # Plain dicts of callables: the parameters they read belong to the adapters' own modules.
        self.prefixes: dict[str, PrefixSource] = {}
        self.branches: dict[str, Branch] = {}

    def is_empty(self) -> bool:
        """Whether no adapter uses this wrapper any more."""
        return not (self.prefixes or self.branches)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(P, attn_dim)`` → ``(H, P, head_dim)``."""
        a = self.base
        return t.reshape(t.shape[0], a.num_heads, a.head_dim).transpose(0, 1)

    def _prefix_heads(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every adapter's prefix keys and values, ``(B, H, P, head_dim)`` each, or ``None``."""
        if not self.prefixes:
            return None
        pairs = [source() for source in self.prefixes.values()]
        k = torch.cat([self._heads(k) for k, _ in pairs], dim=1).to(like.dtype)
        v = torch.cat([self._heads(v) for _, v in pairs], dim=1).to(like.dtype)
        return k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        a = self.base
        B, N, _ = x.shape
        gate = a.gate(x).sigmoid() if a.gate is not None else None
        qkv = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        prefix = self._prefix_heads(B, k)
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        q, k = a.q_norm(q), a.k_norm(k)
        if prefix is None:
            out = self._token_attention(q, k, v, attn_mask, is_causal)
        else:
            bias = widen_mask(token_bias(N, q, attn_mask, is_causal), prefix[0].shape[2])
            out = self._token_attention(q, k, v, bias, False)
        for branch in self.branches.values():
            out = out + branch(a, q)
        out = out.transpose(1, 2).reshape(B, N, a.attn_dim)
        out = a.norm(out)
        if gate is not None:
            out = out * gate
        return a.proj_drop(a.proj(out))

    def _token_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                         is_causal: bool) -> torch.Tensor:
        """timm's attention of ``q`` over ``k`` / ``v``, fused or not as the base attention says."""
        a = self.base
        if a.fused_attn:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=a.attn_drop.p if a.training else 0.0, is_causal=is_causal
            )
        scores = (q * a.scale) @ k.transpose(-2, -1)
        bias = token_bias(q.shape[2], scores, attn_mask, is_causal)
        if bias is not None:
            scores = scores + bias
        return a.attn_drop(scores.softmax(dim=-1)) @ v


def token_bias(n: int, like: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor | None:
    """The additive bias of ``attn_mask`` / ``is_causal`` over ``n`` token keys, as timm builds it (or ``None``)."""
    from timm.layers.attention import resolve_self_attn_mask

    return resolve_self_attn_mask(n, like, attn_mask, is_causal)


def widen_mask(bias: torch.Tensor | None, prefix_len: int) -> torch.Tensor | None:
    """``bias`` over ``[prefix; tokens]`` keys: zeros (always visible) for the ``prefix_len`` prefix columns."""
    if bias is None:
        return None
    return F.pad(bias, (prefix_len, 0), value=0.0)


def attention_site(vit: nn.Module, index: int) -> Site:
    """The slot of block ``index``'s timm ``Attention`` (or of its :class:`ExtendedAttention`).

    The slot is looked up through other adapters' wrappers of the whole attention, so an extension
    goes under them. Raises :class:`UnsupportedModelError` unless the layer there is timm's own
    ``Attention`` with timm's forward (whose steps :class:`ExtendedAttention` re-states).
    """
    site = block_site(vit, index, "attn")
    while isinstance(site.module, LayerWrapper) and not isinstance(site.module, ExtendedAttention):
        site = Site(site.label, site.module, "base")
    layer = site.module.base if isinstance(site.module, ExtendedAttention) else site.module
    attention = _timm_attention()
    if not isinstance(layer, attention) or type(layer).forward is not attention.forward:
        raise UnsupportedModelError(
            f"{site.label} is a {type(layer).__qualname__}, not timm's Attention; prefix tuning and gated prompts "
            "re-state timm's Attention.forward and adapt only ViTs built with it"
        )
    return site


def extend(vit: nn.Module, index: int) -> ExtendedAttention:
    """The :class:`ExtendedAttention` of block ``index``, put in the attention's place if not there yet."""
    site = attention_site(vit, index)
    if isinstance(site.module, ExtendedAttention):
        return site.module
    wrapper = ExtendedAttention(site.module)
    site.wrap(wrapper)
    return wrapper


def release(vit: nn.Module, index: int) -> None:
    """Put block ``index``'s plain attention back once no adapter uses its :class:`ExtendedAttention`."""
    site = attention_site(vit, index)
    if isinstance(site.module, ExtendedAttention) and site.module.is_empty():
        site.unwrap(site.module)


def check_attention(vit: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless every block has timm's ``Attention``."""
    for i in range(len(vit.blocks)):
        attention_site(vit, i)


class AttentionMethod(VitMethod):
    """A vit method that extends timm's ``Attention`` through :class:`ExtendedAttention` (prefix, gated prompts)."""

    @classmethod
    def check_vit(cls, vit: nn.Module) -> None:
        check_attention(vit)

    @classmethod
    def supported_families(cls) -> list[str]:
        return [f"{SUPPORTED}, built with timm's Attention"]
