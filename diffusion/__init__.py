"""visionpeft.diffusion: adapting diffusers Stable Diffusion (LoRA, textual inversion, T2I-Adapter).

The methods of this domain are not implemented yet; until they land, none is registered.
"""
