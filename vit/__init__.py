"""visionpeft.vit: adapting timm Vision Transformers (VPT, AdaptFormer, ST-Adapter).

The methods of this domain are not implemented yet; until they land, none is registered.
"""
