"""The diffusion task's evaluation loss: denoising fixed images at fixed timesteps with fixed noise.

The training loss draws new noise and timesteps for every batch, so its curve is noisy and two
runs cannot be compared by it. This loss can: every evaluation of every run noises the same images
(center-cropped at the training resolution, under their captions) at the same timesteps
(``data.eval_timesteps``) with the same noise, drawn on the CPU from a generator seeded by
``data.eval_seed`` and the image's index, never from the global RNG (which training draws from and
checkpoints restore), and independent of how the images are batched or split over processes.
Latents are the VAE posterior's mean. The loss is the plain MSE between the prediction and the
scheduler's target (the noise or the velocity): no min-SNR weighting, noise offset or prior term,
so runs trained with other loss options compare too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset


class EvalImages(Dataset):
    """The evaluation images: the items of ``images`` (a training-style data set), each with its index.

    The index (``eval_index``) seeds the image's noise. ``images`` may be ``None``: no loss is
    evaluated, but the task still evaluates (its sample grids).
    """

    def __init__(self, images: Dataset | None) -> None:
        self.images = images

    def __len__(self) -> int:
        return 0 if self.images is None else len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.images[index], "eval_index": index}


def eval_noise(seed: int, index: int, count: int, shape: Sequence[int]) -> torch.Tensor:
    """``count`` noise tensors of ``shape`` for image ``index``, one per timestep; the same in every run and step."""
    generator = torch.Generator().manual_seed(seed * 1000003 + index)
    return torch.randn((count, *shape), generator=generator)


def eval_latents(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The batch's latents: the mean of the frozen VAE's posterior, times its scaling factor (no sampling)."""
    from visionpeft.diffusion.models import vae_posterior

    sd = getattr(model, "module", model)
    return vae_posterior(sd.vae, batch["pixel_values"]).mode().float() * sd.vae.config.scaling_factor


def denoising_totals(model: nn.Module, batches: Iterable[dict[str, Any]], timesteps: Sequence[int],
                     seed: int) -> dict[str, float]:
    """The summed prediction errors over ``batches`` (each image at every timestep), overall and per timestep.

    Keys: ``images``, ``loss_sum`` and ``loss_sum_t{t}``; they add up over processes
    (:meth:`visionpeft.task.Task.evaluate`), :func:`denoising_metrics` turns them into means.
    """
    from visionpeft.diffusion.loss import prediction_errors

    totals: dict[str, float] = {"images": 0, "loss_sum": 0.0, **{f"loss_sum_t{t}": 0.0 for t in timesteps}}
    for batch in batches:
        latents = eval_latents(model, batch)
        indices = [int(i) for i in batch["eval_index"]]
        noise = torch.stack([eval_noise(seed, i, len(timesteps), latents.shape[1:]) for i in indices])
        noise = noise.to(latents.device, latents.dtype)
        for j, t in enumerate(timesteps):
            steps = torch.full((len(indices),), t, dtype=torch.long, device=latents.device)
            error = float(prediction_errors(model, batch, latents, noise[:, j], steps).sum())
            totals[f"loss_sum_t{t}"] += error
            totals["loss_sum"] += error
        totals["images"] += len(indices)
    return totals


def denoising_metrics(totals: dict[str, float], timesteps: Sequence[int]) -> dict[str, Any]:
    """``loss`` (the mean over images and timesteps), ``loss_t{t}`` (per timestep) and ``images``.

    ``{}`` when no image was evaluated.
    """
    images = int(totals.get("images", 0))
    if not images:
        return {}
    metrics: dict[str, Any] = {"loss": totals["loss_sum"] / (images * len(timesteps))}
    metrics.update({f"loss_t{t}": totals[f"loss_sum_t{t}"] / images for t in timesteps})
    metrics["images"] = images
    return metrics
