"""visionpeft.vit: adapting timm Vision Transformers to images and video.

Methods (registered as entry points, used through ``vp.attach``): ``vpt`` (shallow and deep),
``adaptformer``, ``st_adapter`` and ``aim`` (with :class:`~visionpeft.vit.video.VideoClassifier`), ``ssf``
(scale and shift, mergeable), ``ia3`` ((IA)³ key, value and MLP scales, mergeable), ``adapter``
(Houlsby or Pfeiffer bottleneck adapters; :mod:`visionpeft.vit.sites` is where these three wrap
single layers), ``prefix`` (prefix tuning, with the foldable reparametrisation MLP) and
``gated_prompt`` (LLaMA-Adapter's zero-init gated prompts; both extend timm's attention through
:mod:`visionpeft.vit.attention`), and the baselines ``linear`` and ``full``; the core's ``lora`` and ``bitfit`` work
on timm ViTs through :mod:`visionpeft.vit.hosts`. The ``vit`` task (:mod:`visionpeft.vit.task`)
trains them from run configs on VTAB-1k, FGVC, ImageFolder and video frame folders;
``visionpeft demo`` runs :mod:`visionpeft.vit.demo`. Importing this package does not import timm.
"""
