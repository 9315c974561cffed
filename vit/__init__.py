"""visionpeft.vit: adapting timm Vision Transformers to images and video.

Methods (registered as entry points, used through ``vp.attach``): ``vpt`` (shallow and deep),
``adaptformer``, ``st_adapter`` (with :class:`~visionpeft.vit.video.VideoClassifier`), and the
baselines ``linear`` and ``full``; the core's ``lora`` and ``bitfit`` work on timm ViTs through
:mod:`visionpeft.vit.hosts`. The ``vit`` task (:mod:`visionpeft.vit.task`) trains them from run
configs on VTAB-1k, FGVC, ImageFolder and video frame folders; ``visionpeft demo`` runs
:mod:`visionpeft.vit.demo`. Importing this package does not import timm.
"""
