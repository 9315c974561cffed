"""visionpeft.vla: prompt learning for open_clip CLIP models (CoOp, CoCoOp, MaPLe).

The methods of this domain are not implemented yet; until they land, none is registered.
"""
