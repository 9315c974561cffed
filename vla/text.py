"""The text tower of an open_clip model, run on prompt embeddings instead of token ids.

Prompt learners (CoOp, CoCoOp, MaPLe) build the token embeddings of their prompts themselves: a
start token, learned context vectors, the class name's tokens. :func:`encode_embeddings` runs the
rest of the text tower on them exactly as ``encode_text`` does on token ids (positional
embedding, the transformer with its causal mask, the final norm, the feature at the end-of-text
token, the projection), so a context initialised from "a photo of a" gives the zero-shot
features of "a photo of a {class}.". It works for ``open_clip.CLIP`` (the tower's modules on the
model itself) and ``open_clip.CustomTextCLIP`` (under ``model.text``).

The tower runs only up to the last end-of-text (EOT) token of the batch, not over all 77
positions: under CLIP's causal mask no position after a sequence's EOT reaches the EOT, where the
feature is read, so the prompts' 10-20 tokens give the same features at a fraction of the cost,
to float rounding (about 1e-6: the matrix products are shorter). The zero-shot method runs the
same cut, so CoOp from "a photo of a" equals it bit for bit (while the classifier's prompts fit in
one call of ``TEXT_BATCH``; each call is cut to its own longest prompt). ``full_length=True`` runs all
positions, which is ``encode_text`` bit for bit; towers without a causal mask, or whose pooling
reads another position, always run the full length (:func:`sequence_length`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from visionpeft.errors import UnsupportedModelError


@dataclass(frozen=True)
class TextTower:
    """Where an open_clip model keeps the parts of its text tower.

    ``owner`` is the module holding them: the ``CLIP`` itself, or ``CustomTextCLIP.text``.
    """

    owner: nn.Module

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.owner.token_embedding

    @property
    def positional_embedding(self) -> torch.Tensor:
        return self.owner.positional_embedding

    @property
    def transformer(self) -> nn.Module:
        return self.owner.transformer

    @property
    def ln_final(self) -> nn.Module:
        return self.owner.ln_final

    @property
    def attn_mask(self) -> torch.Tensor | None:
        return self.owner.attn_mask

    @property
    def pool_type(self) -> str:
        # CLIP calls it text_pool_type, TextTransformer pool_type.
        return getattr(self.owner, "text_pool_type", None) or getattr(self.owner, "pool_type", "argmax")

    @property
    def eos_id(self) -> int | None:
        for attr in ("text_eos_id", "eos_id"):  # CLIP's name, then TextTransformer's
            if hasattr(self.owner, attr):
                return getattr(self.owner, attr)
        return None

    @property
    def width(self) -> int:
        """The width of the token embeddings (CoOp's ``ctx_dim``)."""
        return self.token_embedding.weight.shape[1]

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    def cast_dtype(self) -> torch.dtype:
        """The dtype the transformer computes in (fp16 / bf16 for open_clip's low-precision weights)."""
        return self.transformer.get_cast_dtype()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The token embeddings of ``tokens`` (no positional embedding), as ``encode_text`` casts them."""
        return self.token_embedding(tokens).to(self.cast_dtype())


def text_tower(model: nn.Module) -> TextTower:
    """The text tower of an open_clip ``CLIP`` or ``CustomTextCLIP``.

    Raises :class:`UnsupportedModelError` for towers that prompt learning cannot drive the same
    way: Hugging Face text models, CoCa's appended class token, bidirectional pad masks.
    """
    owner = getattr(model, "text", None)
    if owner is None:
        owner = model
    parts = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    missing = [a for a in parts if not hasattr(owner, a)]
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__qualname__} has no open_clip text transformer (missing {missing}); prompt learning "
            "needs open_clip's own text tower (Hugging Face text towers are not supported)"
        )
    if getattr(owner, "cls_emb", None) is not None or getattr(owner, "use_pad_mask", False):
        raise UnsupportedModelError(
            "this text tower appends a class token or uses a padding mask (CoCa-style); prompt learning supports "
            "the causal CLIP text transformer"
        )
    return TextTower(owner)


def _project(tower: TextTower, pooled: torch.Tensor) -> torch.Tensor:
    proj = tower.owner.text_projection
    if proj is None:
        return pooled
    if isinstance(proj, nn.Linear):
        return proj(pooled)
    return pooled @ proj


def run_block(
    transformer: nn.Module, block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """One residual block, recomputed in backward when the transformer has gradient checkpointing on."""
    if getattr(transformer, "grad_checkpointing", False) and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        # open_clip's own call: (x, k_x, v_x, attn_mask) positionally.
        return checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
    return block(x, attn_mask=attn_mask)


def _eot_positions(tower: TextTower, tokens: torch.Tensor) -> torch.Tensor | None:
    """Per row, the position pooling reads (as ``text_global_pool`` finds it); ``None`` if it reads no EOT."""
    if tower.pool_type == "argmax":
        return tokens.argmax(dim=-1)
    if tower.pool_type == "eos" and tower.eos_id is not None:
        return (tokens == tower.eos_id).int().argmax(dim=-1)
    return None


def sequence_length(tower: TextTower, tokens: torch.Tensor, full_length: bool = False) -> int:
    """How many leading positions of ``tokens`` ``(N, L)`` the text tower must run: the last EOT + 1.

    Positions after it cannot change any feature under the causal mask. The full ``L`` is kept when
    asked (``full_length``), or when the positions after the EOT may matter (below).
    """
    length = tokens.shape[1]
    # No causal mask: attention is bidirectional, the padding after the EOT reaches the EOT.
    if full_length or tower.attn_mask is None:
        return length
    eot = _eot_positions(tower, tokens)
    # Pooling that reads no EOT ("last", "first", "none"): the output is a position the cut would move, or all.
    if eot is None or eot.numel() == 0:
        return length
    return int(eot.max().item()) + 1


def _run_blocks(
    tower: TextTower, x: torch.Tensor, attn_mask: torch.Tensor | None, deep_prompts: Sequence[torch.Tensor] | None,
    n_ctx: int,
) -> torch.Tensor:
    transformer = tower.transformer
    if not deep_prompts:
        return transformer(x, attn_mask=attn_mask)
    # MaPLe's deep prompts: before block i (1 <= i <= len(deep)), positions 1..n_ctx are replaced
    # (they lie before every EOT, so a cut sequence still holds them).
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for i, block in enumerate(transformer.resblocks):
        if 1 <= i <= len(deep_prompts):
            h = x if batch_first else x.transpose(0, 1)
            prompt = deep_prompts[i - 1].to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
            h = torch.cat([h[:, :1], prompt, h[:, 1 + n_ctx :]], dim=1)
            x = h if batch_first else h.transpose(0, 1)
        x = run_block(transformer, block, x, attn_mask)
    if not batch_first:
        x = x.transpose(0, 1)
    return x


def encode_embeddings(
    tower: TextTower,
    embeddings: torch.Tensor,
    tokens: torch.Tensor,
    deep_prompts: Sequence[torch.Tensor] | None = None,
    n_ctx: int = 0,
    full_length: bool = False,
) -> torch.Tensor:
    """Text features of prompt ``embeddings`` ``(N, L, width)``; ``tokens`` ``(N, L)`` locate the EOT.

    The same computation as ``encode_text`` from the embedding on: ``+ positional_embedding``,
    the transformer with the causal mask, ``ln_final``, pooling at the end-of-text token (the
    tower's pool type), the text projection, over the first :func:`sequence_length` positions
    (all ``L`` with ``full_length``: then bit for bit ``encode_text``'s). ``deep_prompts`` (MaPLe)
    replace positions ``1..n_ctx`` before blocks ``1..len(deep_prompts)``. Returns
    ``(N, embed_dim)``, not normalised.
    """
    from open_clip.transformer import text_global_pool

    n = sequence_length(tower, tokens, full_length)
    embeddings, tokens = embeddings[:, :n], tokens[:, :n]
    attn_mask = tower.attn_mask
    if attn_mask is not None:
        attn_mask = attn_mask[:n, :n]
    cast = tower.cast_dtype()
    x = embeddings.to(cast) + tower.positional_embedding[:n].to(cast)
    x = _run_blocks(tower, x, attn_mask, deep_prompts, n_ctx)
    x = tower.ln_final(x)
    pooled = text_global_pool(x, tokens, tower.pool_type, eos_token_id=tower.eos_id)
    return _project(tower, pooled)


def get_tokenizer(model_name: str | None, context_length: int) -> Any:
    """open_clip's tokenizer: of ``model_name`` when given, else the bundled OpenAI BPE.

    The OpenAI BPE (``SimpleTokenizer``) ships inside open_clip, so this works offline; it is the
    tokenizer of every open_clip model with its own text transformer trained on OpenAI's vocabulary.
    """
    import open_clip

    if model_name is not None:
        return open_clip.get_tokenizer(model_name, context_length=context_length)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def count_tokens(tokenizer: Any, text: str) -> int:
    """The number of BPE tokens of ``text`` without start and end tokens (CoOp's ``name_lens``)."""
    tokens = tokenizer([text])[0]
    nonzero = int((tokens != 0).sum())
    return nonzero - 2
