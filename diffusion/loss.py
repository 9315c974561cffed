"""The denoising loss of Stable Diffusion training, as diffusers' training scripts compute it.

Latents (``vae.encode(x).latent_dist.sample() * scaling_factor``) are noised at timesteps drawn
uniformly from ``[0, num_train_timesteps)`` by the training ``DDPMScheduler``; the UNet's
prediction is compared with the target of the scheduler's ``prediction_type``: the noise
(``epsilon``) or the velocity (``v_prediction``, ``get_velocity``). Options:

* min-SNR weighting (Hang et al., 2023; ``--snr_gamma``): each sample's MSE times
  ``min(snr, gamma) / snr`` for epsilon, ``min(snr, gamma) / (snr + 1)`` for v-prediction;
* noise offset (``--noise_offset``): ``noise + offset * randn(B, C, 1, 1)``;
* timestep sampling: ``uniform`` (every script but one), or ``cubic``, ``t = (1 - u^3) T`` for
  ``u ~ U(0, 1)``, the T2I-Adapter paper's (section 3.4) and ``train_t2i_adapter_sdxl.py``'s,
  which favours the early, noisy steps where the structure of an image is decided;
* prior preservation (DreamBooth): the rows marked ``is_class`` give a plain MSE ``prior``
  loss and the total is ``instance + prior_loss_weight * prior`` (min-SNR weights the instance
  rows only, as ``train_dreambooth_lora_sdxl.py``).

Random draws use the global RNG, which the trainer seeds and checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visionpeft.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SAMPLING = ("uniform", "cubic")


def sample_timesteps(batch: int, steps: int, device: torch.device, sampling: str = "uniform") -> torch.Tensor:
    """``batch`` training timesteps in ``[0, steps)``: uniform, or cubic ``(1 - u^3) * steps`` (T2I-Adapter)."""
    if sampling == "uniform":
        return torch.randint(0, steps, (batch,), device=device).long()
    if sampling == "cubic":
        u = torch.rand((batch,), device=device)
        return ((1 - u**3) * steps).long().clamp(0, steps - 1)
    raise ConfigError(f"data.loss.timestep_sampling: {sampling!r}; choose one of {list(TIMESTEP_SAMPLING)}")


def snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights of ``timesteps`` (``diffusers.training_utils.compute_snr``)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "epsilon":
        # min(snr, gamma) / snr without the 0 / 0 of a zero-terminal-SNR step (its limit, 1).
        return torch.where(snr < gamma, torch.ones_like(snr), gamma / snr)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ConfigError(f"min-SNR weighting is defined for {PREDICTION_TYPES}, not {prediction_type!r}")


def target_for(noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """What the UNet must predict: the noise, or the velocity ``alpha_t * noise - sigma_t * x0``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(
        f"the scheduler's prediction_type {prediction_type!r} is not supported; training supports {PREDICTION_TYPES}"
    )


def combine(per_sample: torch.Tensor, is_class: torch.Tensor | None, weights: torch.Tensor | None,
            prior_loss_weight: float) -> torch.Tensor:
    """The batch loss from per-sample MSEs: weighted instance mean plus ``prior_loss_weight`` x class mean."""
    if is_class is None or not bool(is_class.any()):
        return (per_sample * weights).mean() if weights is not None else per_sample.mean()
    instance = ~is_class
    inst = per_sample[instance]
    inst = (inst * weights[instance]).mean() if weights is not None else inst.mean()
    return inst + prior_loss_weight * per_sample[is_class].mean()


def _unwrap(model: nn.Module) -> nn.Module:
    # accelerate / DDP wrap the model; its attributes live on .module.
    return getattr(model, "module", model)


def latents_of(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The batch's latents: a sample of the cached VAE posterior, or the frozen VAE's encoding of the pixels."""
    sd = _unwrap(model)
    if "latent_dist" in batch:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        params = batch["latent_dist"].float()
        return DiagonalGaussianDistribution(params).sample() * sd.vae.config.scaling_factor
    with torch.no_grad():
        return sd.encode_images(batch["pixel_values"]).float()


def diffusion_loss(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    prior_loss_weight: float = 1.0,
    timestep_sampling: str = "uniform",
) -> torch.Tensor:
    """The denoising loss of ``batch`` (a :func:`visionpeft.diffusion.data.collate` batch) for ``model``."""
    sd = _unwrap(model)
    latents = latents_of(model, batch)
    noise = torch.randn_like(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    scheduler = sd.noise_scheduler
    steps = scheduler.config.num_train_timesteps
    timesteps = sample_timesteps(latents.shape[0], steps, latents.device, timestep_sampling)
    per_sample = prediction_errors(model, batch, latents, noise, timesteps)
    weights = snr_weights(scheduler, timesteps, snr_gamma, scheduler.config.prediction_type) if snr_gamma else None
    return combine(per_sample, batch.get("is_class"), weights, prior_loss_weight)


def prediction_errors(model: nn.Module, batch: dict[str, Any], latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """Each sample's MSE between the model's prediction for ``latents`` noised with ``noise`` at ``timesteps``
    and the scheduler's target (the noise or the velocity), under the batch's prompts and conditions."""
    sd = _unwrap(model)
    scheduler = sd.noise_scheduler
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = target_for(scheduler, latents, noise, timesteps, scheduler.config.prediction_type)
    added = None
    if sd.is_sdxl:
        size = latents.shape[-2] * sd.vae_scale_factor, latents.shape[-1] * sd.vae_scale_factor
        added = {"time_ids": torch.cat([batch["original_size"], batch["crop_top_left"],
                                        torch.tensor(size, device=latents.device).expand(latents.shape[0], 2)],
                                       dim=1).float()}
    pred = model(noisy, timesteps, batch["input_ids"], batch.get("input_ids_2"), batch.get("condition"), added)
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
