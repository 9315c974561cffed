"""visionpeft.vla: prompt learning for open_clip CLIP models (CoOp, CoCoOp, MaPLe, zero-shot CLIP).

``vp.attach(clip, "coop", classnames=[...])`` returns a module mapping images to class logits
with only the prompt learner trainable; ``model.set_classnames([...])`` moves a learned context to
other classes (base → novel). The ``vla`` task runs the few-shot and base-to-novel protocols of
the papers (``visionpeft train`` with ``task: vla``).
"""

from visionpeft.vla.text import encode_embeddings, text_tower

__all__ = ["encode_embeddings", "text_tower"]
