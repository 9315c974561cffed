"""What a learned context "says": the vocabulary words nearest to each context vector.

The CoOp paper's analysis (``interpret_prompt.py`` in KaiyangZhou/CoOp): for every learned vector,
the tokens of CLIP's vocabulary whose embeddings are closest in Euclidean distance. Learned
vectors rarely land on words, so the distances matter as much as the words.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from visionpeft.errors import AdapterError
from visionpeft.files import atomic_write_text


def _decode(tokenizer: Any, index: int) -> str:
    decoder = getattr(tokenizer, "decoder", None)
    if decoder is not None:
        return decoder.get(index, f"<{index}>").replace("</w>", "")
    return tokenizer.decode([index])


def nearest_words(model: nn.Module, k: int = 3) -> list[dict[str, Any]]:
    """For each learned context vector of a prompted CLIP, its ``k`` nearest vocabulary tokens.

    Returns one record per vector: ``{"position", "class" (class-specific contexts only),
    "words": [[token, distance], ...]}``. Raises :class:`AdapterError` for a model without a
    learned context (zero-shot CLIP).
    """
    learner = getattr(model, "prompt_learner", None)
    ctx = getattr(learner, "ctx", None)
    if ctx is None:
        raise AdapterError("this model has no learned context to interpret; attach coop, cocoop or maple first")
    vocabulary = learner.tower.token_embedding.weight.detach().float()
    vectors = ctx.detach().float().to(vocabulary.device)
    rows = vectors.reshape(-1, vectors.shape[-1])
    distance = torch.cdist(rows, vocabulary, compute_mode="donot_use_mm_for_euclid_dist")
    values, indices = distance.topk(k, dim=1, largest=False)
    records = []
    for i in range(rows.shape[0]):
        record: dict[str, Any] = {"position": i % vectors.shape[-2] + 1}
        if vectors.dim() == 3:
            record["class"] = learner.classnames[i // vectors.shape[-2]]
        record["words"] = [[_decode(learner.tokenizer, int(j)), round(float(d), 4)]
                           for j, d in zip(indices[i], values[i], strict=True)]
        records.append(record)
    return records


def format_nearest_words(records: list[dict[str, Any]]) -> str:
    """A printable table: one line per context vector with its nearest words and distances."""
    lines = []
    for r in records:
        where = f"{r['class']}: " if "class" in r else ""
        words = ", ".join(f"{w} ({d:.3f})" for w, d in r["words"])
        lines.append(f"{where}ctx {r['position']:>2}: {words}")
    return "\n".join(lines)


def write_nearest_words(model: nn.Module, path: str | os.PathLike, k: int = 3) -> list[dict[str, Any]]:
    """Compute :func:`nearest_words` and write them as JSON to ``path`` (atomically)."""
    records = nearest_words(model, k)
    atomic_write_text(path, json.dumps(records, indent=2) + "\n")
    return records
