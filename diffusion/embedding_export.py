"""Textual-inversion embedding files in the formats diffusers, AUTOMATIC1111, ComfyUI and kohya read.

- diffusers: ``learned_embeds.safetensors`` holding ``{placeholder: tensor[num_vectors, dim]}``, as
  diffusers' ``textual_inversion.py`` writes it (``metadata={"format": "pt"}``); for SDXL also
  ``learned_embeds_2.safetensors`` for the second text encoder, as ``textual_inversion_sdxl.py``
  does. ``pipe.load_textual_inversion(folder)`` reads the first directly.
- AUTOMATIC1111 ``.pt`` (SD 1.x/2.x): ``{"string_to_token": {"*": 265}, "string_to_param": {"*":
  tensor}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}``, the dict of A1111's
  ``Embedding.save`` (265 is the id of ``*`` in CLIP's vocabulary; readers ignore it). Plain
  tensors, ints and strings only, so ``torch.load(weights_only=True)`` (diffusers) opens it.
- ``.safetensors`` with ``{"emb_params": tensor}`` (SD 1.x/2.x; kohya's format, read by A1111 and
  ComfyUI), and ``{"clip_l": tensor, "clip_g": tensor}`` for SDXL (kohya / A1111 / ComfyUI).
  diffusers reads ``emb_params`` only with ``token=...`` and the SDXL pair only per encoder:
  :func:`load_sdxl_embedding` makes the two calls (diffusers#5327, #8854).

A1111 and ComfyUI name an embedding after its file, so those files are called
:func:`file_stem` of the placeholder (``<cat-toy>`` → ``cat-toy``): the word to write in their
prompts.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from visionpeft import tensorfiles
from visionpeft.errors import DataError
from visionpeft.files import atomic_write_bytes

DIFFUSERS_NAME = "learned_embeds.safetensors"
DIFFUSERS_NAME_2 = "learned_embeds_2.safetensors"
#: the id A1111 writes for ``*`` in ``string_to_token`` (CLIP's id of ``*</w>``)
A1111_STAR_TOKEN_ID = 265


def file_stem(placeholder: str) -> str:
    """A file name for ``placeholder`` that every OS accepts: characters other than letters, digits,
    ``.``, ``_`` and ``-`` are dropped (``<cat-toy>`` → ``cat-toy``); ``"embedding"`` if none remain."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "", placeholder).strip(".")
    return stem or "embedding"


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    # clone(): a view would serialise its whole storage into a .pt file.
    return tensor.detach().to("cpu", torch.float32).contiguous().clone()


def write_diffusers(path: str | os.PathLike, placeholder: str, vectors: torch.Tensor) -> Path:
    """Write ``{placeholder: vectors}`` (``[num_vectors, dim]``) as diffusers' ``learned_embeds.safetensors``."""
    path = Path(path)
    atomic_write_bytes(path, safetensors_save({placeholder: _plain(vectors)}, metadata={"format": "pt"}))
    return path


def write_a1111_pt(path: str | os.PathLike, placeholder: str, vectors: torch.Tensor, step: int | None = None) -> Path:
    """Write the A1111 ``.pt`` embedding dict (see the module docstring) for ``vectors``."""
    payload: dict[str, Any] = {
        "string_to_token": {"*": A1111_STAR_TOKEN_ID},
        "string_to_param": {"*": _plain(vectors)},
        "name": placeholder,
        "step": step,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_emb_params(path: str | os.PathLike, vectors: torch.Tensor) -> Path:
    """Write ``{"emb_params": vectors}`` (kohya / A1111 / ComfyUI ``.safetensors``, SD 1.x/2.x)."""
    path = Path(path)
    atomic_write_bytes(path, safetensors_save({"emb_params": _plain(vectors)}, metadata={"format": "pt"}))
    return path


def write_sdxl(path: str | os.PathLike, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    """Write ``{"clip_l", "clip_g"}`` (SDXL's two text encoders) as kohya / A1111 / ComfyUI read them."""
    path = Path(path)
    blob = safetensors_save({"clip_l": _plain(clip_l), "clip_g": _plain(clip_g)}, metadata={"format": "pt"})
    atomic_write_bytes(path, blob)
    return path


def load_sdxl_embedding(pipe: Any, path: str | os.PathLike, token: str) -> None:
    """Load a ``{"clip_l", "clip_g"}`` file into an SDXL pipeline under ``token`` (changes ``pipe``).

    diffusers' ``load_textual_inversion`` rejects the two-key file; this makes the documented pair
    of calls, one per text encoder and tokenizer.
    """
    path = Path(path)
    tensors = tensorfiles.read_safetensors(path, error=DataError, fix="export the embedding again")
    missing = [k for k in ("clip_l", "clip_g") if k not in tensors]
    if missing:
        raise DataError(f"{path} is not an SDXL embedding: it lacks {missing} (found keys {sorted(tensors)})")
    pipe.load_textual_inversion(tensors["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(tensors["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
