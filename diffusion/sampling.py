"""Sample images during training: a PNG grid of the sample prompts, with the seeds beside it.

Each prompt is sampled with its own seeded ``torch.Generator``, so a grid is reproducible and the
same prompt/seed pair can be compared across steps; the global RNG (which the trainer's dropout,
noise and timesteps draw from, and which checkpoints restore) is forked and put back, and the
modules' train/eval modes are restored, so sampling leaves training exactly as it found it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from visionpeft.files import atomic_write_bytes, atomic_write_text

SAMPLES_DIR = "samples"


def make_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """The images side by side in rows of ``columns`` (all of them in one row by default)."""
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * w, (i // columns) * h))
    return grid


def generate(
    model: nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    conditions: Sequence[Image.Image] | None = None,
) -> list[Image.Image]:
    """One image per prompt from ``model.to_pipeline()``, each from ``torch.Generator("cpu").manual_seed(seed)``.

    ``conditions`` are the T2I-Adapter's control images, one per prompt. The global RNG and every
    module's training flag are the same afterwards.
    """
    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    pipe = model.to_pipeline()
    images = []
    try:
        model.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad(), warnings.catch_warnings():
            # The adapter pipelines still decode through their deprecated decode_latents.
            warnings.filterwarnings("ignore", message="The decode_latents method is deprecated")
            for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
                # A CPU generator: the same seed gives the same initial noise on every device.
                generator = torch.Generator("cpu").manual_seed(seed)
                kwargs: dict[str, Any] = {
                    "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                    "height": height, "width": width, "generator": generator, "negative_prompt": negative_prompt,
                }
                if conditions is not None:
                    kwargs["image"] = conditions[i]
                images.append(pipe(prompt, **kwargs).images[0])
    finally:
        for module, training in modes.items():
            module.training = training
    return images


def save_samples(
    model: nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    output_dir: str | os.PathLike,
    step: int,
    **options: Any,
) -> Path:
    """Generate the prompts' images, write ``samples/step-XXXXXXX_seed-S.png`` and its JSON sidecar.

    ``S`` is the first prompt's seed; the sidecar lists every prompt with its seed and the
    sampling settings. Returns the grid's path.
    """
    conditions = options.pop("conditions", None)
    images = generate(model, prompts, seeds, conditions=conditions, **options)
    path = Path(output_dir) / grid_name(step, seeds[0])
    import io

    buffer = io.BytesIO()
    make_grid(images).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    pairs = [{"prompt": p, "seed": s} for p, s in zip(prompts, seeds, strict=True)]
    record = {"step": step, "grid": path.name, "prompts": pairs,
              **{k: v for k, v in options.items() if isinstance(v, (int, float, str, type(None)))}}
    atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    return path


def grid_name(step: int, seed: int) -> str:
    """Where :func:`save_samples` writes the grid of ``step`` whose first prompt has ``seed``, in the run folder."""
    return f"{SAMPLES_DIR}/step-{step:07d}_seed-{seed}.png"
