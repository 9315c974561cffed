"""visionpeft: parameter-efficient adaptation of large pretrained vision models.

>>> import visionpeft as vp
>>> model = vp.attach(model, "lora", r=8)      # doctest: +SKIP
>>> vp.save(model, "out/adapter")              # doctest: +SKIP

The public API is the eight functions below; methods are plugins found through the entry-point
group ``visionpeft.methods``.
"""

from visionpeft._version import __version__ as __version__
from visionpeft.api import attach, config, detach, load, merge, methods, save, summary

__all__ = ["attach", "config", "detach", "load", "merge", "methods", "save", "summary"]
