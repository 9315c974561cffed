"""Hand-written prompt templates for zero-shot CLIP: CoOp's per-data-set templates and open_clip's ensembles.

* :data:`CUSTOM_TEMPLATES`: CoOp's ``trainers/zsclip.py`` table, one template per data set, used by
  ``ZeroshotCLIP`` (the "CLIP" rows of the CoOp, CoCoOp and MaPLe tables).
* ``simple``: the 7 templates CoOp calls ``IMAGENET_TEMPLATES_SELECT``, equal to
  ``open_clip.SIMPLE_IMAGENET_TEMPLATES``; ``openai``: the 80 of CLIP's ImageNet notebook,
  ``open_clip.OPENAI_IMAGENET_TEMPLATES``. Both are read from open_clip when asked for; open_clip
  holds them as callables (``lambda c: f"itap of a {c}."``), turned here into ``{}`` strings.
* ``ensemble``: ``ZeroshotCLIP2``'s rule, the 7 plus the data set's custom template unless the data set
  is ImageNet.

Every function returns ``str.format`` strings with one ``{}``; :func:`format_templates` fills those or
open_clip's callables, with ``_`` in class names turned into spaces as CoOp does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from visionpeft.errors import ConfigError, DataError
from visionpeft.vla.data import DATASETS, canonical_dataset, closest_name, prompt_classname

Template = str | Callable[[str], str]

# CoOp trainers/zsclip.py CUSTOM_TEMPLATES, keyed by CoOp's data set names.
CUSTOM_TEMPLATES: dict[str, str] = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}
# For data outside the table (image folders): CoOp's ImageNet template, also CoOp's ctx_init.
DEFAULT_TEMPLATE = "a photo of a {}."
TEMPLATE_SETS = ("custom", "simple", "openai", "ensemble")


def _template_key(dataset: str) -> str:
    if dataset in CUSTOM_TEMPLATES:
        return dataset
    lowered = {name.lower(): name for name in CUSTOM_TEMPLATES}
    if dataset.lower() in lowered:
        return lowered[dataset.lower()]
    try:
        return DATASETS[canonical_dataset(dataset)].template
    except DataError:
        hint = closest_name(dataset, CUSTOM_TEMPLATES)
        suggestion = f"; did you mean {hint!r}?" if hint else "."
        raise DataError(f"no template for data set {dataset!r}{suggestion} Known: {list(CUSTOM_TEMPLATES)}; pass "
                        f"dataset=None for the default {DEFAULT_TEMPLATE!r}") from None


def template_for(dataset: str | None) -> str:
    """The data set's single zero-shot template from :data:`CUSTOM_TEMPLATES` (CoOp's ``ZeroshotCLIP``).

    Any spelling :func:`~visionpeft.vla.data.canonical_dataset` accepts works (``dtd``, ``caltech-101``);
    ``None`` gives :data:`DEFAULT_TEMPLATE`.
    """
    return DEFAULT_TEMPLATE if dataset is None else CUSTOM_TEMPLATES[_template_key(dataset)]


def _format_strings(templates: Sequence[Template]) -> list[str]:
    """open_clip's template callables as ``{}`` format strings (each called with ``"{}"``)."""
    strings = [t("{}") if callable(t) else t for t in templates]
    bad = [t for t in strings if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise ConfigError(f"templates {bad[:3]} do not have exactly one '{{}}' for the class name")
    return strings


def simple_templates() -> list[str]:
    """open_clip's 7 ``SIMPLE_IMAGENET_TEMPLATES`` (CoOp's ``IMAGENET_TEMPLATES_SELECT``) as ``{}`` strings."""
    import open_clip

    return _format_strings(open_clip.SIMPLE_IMAGENET_TEMPLATES)


def openai_templates() -> list[str]:
    """open_clip's 80 ``OPENAI_IMAGENET_TEMPLATES`` (CLIP's ImageNet notebook, CoOp's ``IMAGENET_TEMPLATES``)."""
    import open_clip

    return _format_strings(open_clip.OPENAI_IMAGENET_TEMPLATES)


def ensemble_templates(dataset: str | None) -> list[str]:
    """``ZeroshotCLIP2``'s ensemble: the 7 simple templates, plus the data set's custom one unless it is ImageNet.

    CoOp appends to a class attribute, so its list grows on every model build; this returns a new list.
    """
    templates = simple_templates()
    if dataset is None or _template_key(dataset) != "ImageNet":
        templates.append(template_for(dataset))
    return templates


def templates_for(dataset: str | None, kind: str = "custom") -> list[str]:
    """The templates of ``kind``: ``custom`` (the data set's one), ``simple`` (7), ``openai`` (80) or ``ensemble``."""
    if kind == "custom":
        return [template_for(dataset)]
    if kind == "simple":
        return simple_templates()
    if kind == "openai":
        return openai_templates()
    if kind == "ensemble":
        return ensemble_templates(dataset)
    raise ConfigError(f"templates: {kind!r} is not supported; choose one of {list(TEMPLATE_SETS)}")


def format_template(template: Template, classname: str) -> str:
    """One prompt: ``template`` (a ``{}`` string or a callable) filled with ``classname``, ``_`` as spaces."""
    name = prompt_classname(classname)
    if callable(template):
        return template(name)
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ConfigError(f"template {template!r} must be a string with exactly one '{{}}' for the class name, or "
                          "a callable taking the class name")
    return template.format(name)


def format_templates(templates: Sequence[Template], classname: str) -> list[str]:
    """The prompts of every template for one class (see :func:`format_template`)."""
    return [format_template(t, classname) for t in templates]
