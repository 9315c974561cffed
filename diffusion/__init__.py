"""visionpeft.diffusion: adapting diffusers Stable Diffusion (LoRA, textual inversion, T2I-Adapter).

:class:`~visionpeft.diffusion.models.StableDiffusionModel` holds a pipeline's UNet, VAE and text
encoder(s) as one module, the host of every method here (:mod:`visionpeft.diffusion.hosts`); the
``diffusion`` task (:mod:`visionpeft.diffusion.task`) trains it with the shared trainer and writes
the files diffusers, ComfyUI and AUTOMATIC1111 load (:mod:`visionpeft.diffusion.lora_export`,
textual-inversion embeddings, T2I-Adapter folders). Submodules import diffusers lazily.
"""
