"""Textual inversion (Gal et al., 2022) for diffusers Stable Diffusion: new token vectors, nothing else.

As diffusers' ``examples/textual_inversion/textual_inversion.py``: the placeholder token (and, with
``num_vectors > 1``, ``<tok>_1``, ``<tok>_2``, ...) is added to the tokenizer, each new vector starts
as a copy of the initializer token's embedding, and only those vectors learn. The script trains the
whole embedding matrix and copies the other rows back after every optimizer step; here the new
vectors are the only trainable tensor: the text encoder's ``token_embedding`` is wrapped in a
:class:`NewTokenEmbedding` that looks the new ids up in its own small parameter and every other id
in the untouched original embedding, so the rest of the vocabulary gets no gradient and no
optimizer state and stays bit-identical (weight decay included). With SDXL both text encoders get
their own vectors (``clip_l``, ``clip_g``), as ``textual_inversion_sdxl.py`` trains.

The tokenizers are copied before the tokens are added, so a pipeline sharing the original tokenizer
is not changed; :meth:`TextualInversion.detach` puts the original tokenizers and embedding modules
back. :func:`export_embeddings` writes the diffusers, A1111 and kohya files
(:mod:`visionpeft.diffusion.embedding_export`).

Prompts name a multi-vector placeholder once (``a photo of <tok>``);
:meth:`~visionpeft.diffusion.models.StableDiffusionModel.tokenize` spells out its vectors as
diffusers' pipelines do at inference (``maybe_convert_prompt``), so training and inference agree.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visionpeft.config import MethodConfig, field
from visionpeft.diffusion.base import DiffusionMethod
from visionpeft.errors import AdapterError, ConfigError
from visionpeft.inject import Replacement, replace_module
from visionpeft.method import RunInfo, get_state

#: the model attributes of each text encoder and its tokenizer, and the key of its vectors
ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


@dataclasses.dataclass
class TextualInversionConfig(MethodConfig):
    """Textual inversion's settings; the defaults are diffusers' (one vector) and A1111's (``*``)."""

    placeholder_token: str = field("<concept>", help="the new word to write in prompts, e.g. '<cat-toy>'")
    initializer_token: str = field(
        "*", help="a word that is one token in the tokenizer; its embedding initialises the new vectors"
    )
    num_vectors: int = field(1, help="vectors of the placeholder: tokens <tok>, <tok>_1, ...", ge=1)

    def check(self) -> None:
        for name in ("placeholder_token", "initializer_token"):
            value = getattr(self, name)
            if not value.strip() or any(c.isspace() for c in value):
                raise ConfigError(f"textual_inversion.{name}: {value!r} must be one word, without spaces")


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """The tokens of a placeholder with ``num_vectors`` vectors: ``[tok, tok_1, ..., tok_{n-1}]``."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


class NewTokenEmbedding(nn.Module):
    """A token embedding with trainable rows for the ids ``first_id .. first_id + n - 1``.

    Other ids go to ``base`` (the original embedding, frozen and unchanged), the new ids to
    ``rows``; no full-vocabulary tensor is built, so the gradient and the optimizer state are the
    size of the new rows. ``rows`` may be fp32 while ``base`` is half precision (the trainer keeps
    trained tensors in fp32); looked-up vectors come out in ``base``'s dtype.
    """

    def __init__(self, base: nn.Module, first_id: int, init: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.rows = nn.Parameter(init)

    @property
    def num_embeddings(self) -> int:
        """The vocabulary size this embedding answers for, new tokens included."""
        return max(self.base.num_embeddings, self.first_id + self.rows.shape[0])

    @property
    def embedding_dim(self) -> int:
        """The width of one embedding vector."""
        return self.rows.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """The full embedding matrix, new rows in place (built on each access; for reading)."""
        base = self.base.weight
        return torch.cat([base[: self.first_id], self.rows.to(base.dtype), base[self.first_id + self.rows.shape[0] :]])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``input_ids``: new ids from ``rows``, every other id from ``base``."""
        count = self.rows.shape[0]
        is_new = (input_ids >= self.first_id) & (input_ids < self.first_id + count)
        old = self.base(input_ids.masked_fill(is_new, 0))
        # Every batch uses `rows` (zero gradient when no placeholder occurs), as DDP requires.
        new = F.embedding((input_ids - self.first_id).clamp(0, count - 1), self.rows).to(old.dtype)
        return torch.where(is_new.unsqueeze(-1), new, old)


def _encoders(model: nn.Module) -> list[tuple[str, str, nn.Module, Any]]:
    out = []
    for encoder_attr, tokenizer_attr in ENCODERS:
        encoder = getattr(model, encoder_attr, None)
        if encoder is not None:
            out.append((encoder_attr, tokenizer_attr, encoder, getattr(model, tokenizer_attr)))
    return out


def _embedding_name(model: nn.Module, encoder_attr: str, encoder: nn.Module) -> str:
    embedding = encoder.get_input_embeddings()
    for name, module in encoder.named_modules():
        if module is embedding:
            return f"{encoder_attr}.{name}"
    raise AdapterError(f"{encoder_attr}.get_input_embeddings() is not a submodule of {encoder_attr}")


def _check_new_word(tokenizer: Any, placeholder: str, tokens: list[str], where: str) -> None:
    """Refuse placeholder tokens the tokenizer has already, as such or as one word (``toy`` is ``toy</w>``)."""
    taken = [t for t in tokens if t in tokenizer.get_vocab()]
    if taken:
        raise ConfigError(
            f"textual_inversion.placeholder_token: {taken} already in the {where} vocabulary; choose a new "
            "word (e.g. '<my-concept>') so the placeholder does not change an existing token's meaning"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in tokens:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) == 1 and ids[0] != unk:
            # An added token is matched before BPE: the word would mean the new vector in every prompt.
            word = tokenizer.convert_ids_to_tokens(ids)[0]
            raise ConfigError(
                f"textual_inversion.placeholder_token: {token!r} is the word {word!r} of the {where} vocabulary; as "
                "a new token it would take that word over in every prompt; choose a new word, usually in angle "
                f"brackets: '<{placeholder.strip('<>')}>'"
            )


def _initializer_id(tokenizer: Any, word: str, where: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(
            f"textual_inversion.initializer_token: {word!r} is {len(ids)} tokens {pieces} in the {where}, not one; "
            "choose a word the tokenizer has as a single token (a common English word such as 'toy' or 'dog')"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and word != tokenizer.unk_token:
        raise ConfigError(
            f"textual_inversion.initializer_token: {word!r} is not in the {where}'s vocabulary (it maps to the "
            f"unknown token {tokenizer.unk_token!r}); choose a word the tokenizer knows"
        )
    return ids[0]


class TextualInversion(DiffusionMethod):
    """New placeholder-token vectors in the text encoder(s); the only trained tensors."""

    name = "textual_inversion"
    description = "textual inversion for Stable Diffusion: only a new token's vectors train (SD, SDXL)"
    Config = TextualInversionConfig
    mergeable = False
    freezes_base = True
    starts_as_identity = False  # the placeholder is a new id, which the base model cannot embed

    def __init__(self, config: MethodConfig, adapter_name: str = "default") -> None:
        super().__init__(config, adapter_name)
        self._replacements: dict[str, Replacement] = {}
        self._tokenizers: dict[str, Any] = {}


    @property
    def tokens(self) -> list[str]:
        """The placeholder's tokens, ``[tok, tok_1, ...]``."""
        return placeholder_tokens(self.config.placeholder_token, self.config.num_vectors)

    def attach(self, model: nn.Module) -> nn.Module:
        plan = []
        for encoder_attr, tokenizer_attr, encoder, tokenizer in _encoders(model):
            where = f"{tokenizer_attr} ({type(tokenizer).__name__})"
            _check_new_word(tokenizer, self.config.placeholder_token, self.tokens, where)
            init_id = _initializer_id(tokenizer, self.config.initializer_token, where)
            embedding_name = _embedding_name(model, encoder_attr, encoder)
            base = model.get_submodule(embedding_name)
            if len(tokenizer) > base.num_embeddings:
                raise AdapterError(
                    f"{where} has {len(tokenizer)} tokens but {encoder_attr} only {base.num_embeddings} embeddings; "
                    "the tokenizer does not belong to this text encoder"
                )
            plan.append((encoder_attr, tokenizer_attr, tokenizer, init_id, embedding_name, base))
        for encoder_attr, tokenizer_attr, tokenizer, init_id, embedding_name, base in plan:
            extended = copy.deepcopy(tokenizer)
            extended.add_tokens(self.tokens)
            ids = extended.convert_tokens_to_ids(self.tokens)
            first = ids[0]
            if ids != list(range(first, first + len(ids))):
                raise AdapterError(f"the placeholder's tokens got non-consecutive ids {ids} in {tokenizer_attr}")
            with torch.no_grad():
                vector = base.weight[init_id].detach()
                dtype = torch.float32 if vector.dtype in (torch.float16, torch.bfloat16) else vector.dtype
                init = vector.to(dtype).repeat(len(ids), 1).clone()
            wrapper = NewTokenEmbedding(base, first, init)
            self._replacements[encoder_attr] = replace_module(model, embedding_name, wrapper)
            self._tokenizers[tokenizer_attr] = tokenizer
            setattr(model, tokenizer_attr, extended)
        return model

    def detach(self, model: nn.Module) -> nn.Module:
        for replacement in reversed(list(self._replacements.values())):
            replacement.restore()
        for attr, tokenizer in self._tokenizers.items():
            setattr(model, attr, tokenizer)
        self._replacements, self._tokenizers = {}, {}
        return model

    def _wrappers(self) -> dict[str, NewTokenEmbedding]:
        return {attr: r.replacement for attr, r in self._replacements.items()}

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {attr: wrapper.rows for attr, wrapper in self._wrappers().items()}

    def train_modules(self, model: nn.Module) -> list[nn.Module] | None:
        return list(self._wrappers().values())

    def check_prompts(self, model: nn.Module, prompts: Sequence[str], source: str,
                      class_prompts: Sequence[str] = ()) -> None:
        """Refuse training prompts none of which writes the placeholder (its vectors would learn nothing) and
        class prompts that write it (the class images would teach the concept the whole class).

        A prompt writes it when every tokenizer of ``model`` keeps its first token within its length.
        """
        token = self.config.placeholder_token
        unique = list(dict.fromkeys(prompts))
        if not any(self._uses(model, unique)):
            example = unique[0] if unique else ""
            raise ConfigError(
                f"method.placeholder_token: {token!r} is in none of the {len(prompts)} training prompts ({source}), "
                f"e.g. {example!r}; its vectors would never be used and learn nothing; write it in them, e.g. "
                f"'a photo of {token}'"
            )
        unique = list(dict.fromkeys(class_prompts))
        for prompt, uses in zip(unique, self._uses(model, unique), strict=True):
            if uses:
                raise ConfigError(
                    f"method.placeholder_token: {token!r} is in the class prompt {prompt!r}; prior preservation would "
                    "train its vectors on the class images; write the class prompt without it (e.g. 'a photo of a "
                    "dog')"
                )

    def _uses(self, model: nn.Module, prompts: list[str]) -> list[bool]:
        """Per prompt, whether every tokenizer of ``model`` keeps the placeholder's first token."""
        uses = [True] * len(prompts)
        for attr, ids in self.token_ids(model).items():
            tokenizer = getattr(model, attr)
            for start in range(0, len(prompts), 1024):
                chunk = prompts[start : start + 1024]
                encoded = tokenizer(chunk, truncation=True, max_length=tokenizer.model_max_length).input_ids
                for i, row in enumerate(encoded, start):
                    uses[i] = uses[i] and ids[0] in row
        return uses

    def token_ids(self, model: nn.Module) -> dict[str, list[int]]:
        """The placeholder's token ids in each tokenizer of ``model`` (``{"tokenizer": [519, 520]}``)."""
        return {attr: getattr(model, attr).convert_tokens_to_ids(self.tokens) for attr in self._tokenizers}

    def export(self, model: nn.Module, output_dir: str | os.PathLike, run: RunInfo) -> None:
        """The embedding files of diffusers, A1111 and ComfyUI (:func:`write_embeddings`); a subfolder per
        adapter when several textual inversions are attached."""
        folder = Path(output_dir)
        if len(_ti_adapters(model)) > 1:
            folder = folder / self.adapter_name
        write_embeddings(self, folder, step=run.step or None)

    def vectors(self) -> dict[str, torch.Tensor]:
        """The learned vectors per text encoder, detached: ``{"text_encoder": [n, dim], ...}``."""
        return {attr: wrapper.rows.detach() for attr, wrapper in self._wrappers().items()}


def _ti_adapters(model: nn.Module) -> dict[str, TextualInversion]:
    state = get_state(model)
    found = {} if state is None else {
        name: a.method for name, a in state.adapters.items() if isinstance(a.method, TextualInversion)
    }
    if not found:
        raise AdapterError("no textual_inversion adapter is attached to this model; vp.attach(model, "
                           "'textual_inversion', placeholder_token=..., initializer_token=...) first")
    return found


def write_embeddings(method: TextualInversion, folder: str | os.PathLike, step: int | None = None) -> list[Path]:
    """Write one textual-inversion adapter's learned embeddings into ``folder``; return the files.

    SD 1.x/2.x: ``learned_embeds.safetensors`` (diffusers), ``<stem>.pt`` (A1111) and
    ``<stem>.safetensors`` (``emb_params``: kohya, A1111, ComfyUI). SDXL: ``learned_embeds.safetensors``
    and ``learned_embeds_2.safetensors`` (diffusers, one per text encoder) and ``<stem>.safetensors``
    (``clip_l`` / ``clip_g``). ``<stem>`` is the placeholder as a file name (``<cat-toy>`` →
    ``cat-toy``), the name A1111 and ComfyUI prompts use. ``step`` is recorded in the A1111 file.
    """
    from visionpeft.diffusion import embedding_export as ex

    folder = Path(folder)
    vectors = method.vectors()
    token = method.config.placeholder_token
    stem = ex.file_stem(token)
    written = [ex.write_diffusers(folder / ex.DIFFUSERS_NAME, token, vectors["text_encoder"])]
    if "text_encoder_2" in vectors:
        written.append(ex.write_diffusers(folder / ex.DIFFUSERS_NAME_2, token, vectors["text_encoder_2"]))
        written.append(ex.write_sdxl(folder / f"{stem}.safetensors", vectors["text_encoder"],
                                     vectors["text_encoder_2"]))
    else:
        written.append(ex.write_a1111_pt(folder / f"{stem}.pt", token, vectors["text_encoder"], step))
        written.append(ex.write_emb_params(folder / f"{stem}.safetensors", vectors["text_encoder"]))
    return written


def export_embeddings(model: nn.Module, output_dir: str | os.PathLike, step: int | None = None) -> list[Path]:
    """Write the learned embeddings of every textual-inversion adapter of ``model`` (:func:`write_embeddings`).

    With several adapters, each writes into a subfolder named after it. Returns the files.
    """
    adapters = _ti_adapters(model)
    output_dir = Path(output_dir)
    written: list[Path] = []
    for name, method in adapters.items():
        written += write_embeddings(method, output_dir if len(adapters) == 1 else output_dir / name, step)
    return written
