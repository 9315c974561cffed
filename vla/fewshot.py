"""The few-shot and base-to-novel protocol of CoOp, CoCoOp and MaPLe: sampler, class split, seeds.

* :func:`sample_fewshot` is Dassl's ``DatasetBase.generate_fewshot_dataset``: the items grouped by label in
  first-appearance order, ``random.sample`` of K items per label, the groups concatenated label by label.
* :func:`fewshot_splits` draws the training set (K shots) and then the validation set (``min(K, 4)``
  shots) from one RNG seeded with the run's seed, the order of CoOp's dataset classes; with the same split
  file, shots and seed it picks the same images as CoOp.
* :func:`subsample_classes` / :func:`base_novel_splits` are CoOp's ``OxfordPets.subsample_classes``: the
  sorted labels of the training split, the first ``ceil(n / 2)`` the base classes, the rest the novel ones,
  relabelled from 0. CoOp applies it after few-shot sampling; so should callers.
* :data:`SEEDS` are the protocol's seeds (1, 2, 3); results are the mean over them.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Sequence

from visionpeft.errors import ConfigError, DataError
from visionpeft.vla.data import Datum, Splits, make_splits

logger = logging.getLogger("visionpeft")

SEEDS = (1, 2, 3)
SHOTS = (1, 2, 4, 8, 16)
SUBSAMPLES = ("all", "base", "new")
VAL_SHOTS_MAX = 4


def split_by_label(items: Sequence[Datum]) -> dict[int, list[Datum]]:
    """The items of each label, labels in order of first appearance (Dassl's ``split_dataset_by_label``)."""
    groups: defaultdict[int, list[Datum]] = defaultdict(list)
    for item in items:
        groups[item.label].append(item)
    return dict(groups)


def _check_shots(num_shots: int) -> int:
    if isinstance(num_shots, bool) or not isinstance(num_shots, int):
        raise ConfigError(f"num_shots: {num_shots!r} must be an integer (K images per class; -1 for all data)")
    return num_shots


#: what a Python caller does about a class with too few images
FEWER_HINT = "use fewer shots, allow_fewer=True to keep the class whole (as CoOp does) or repeat=True to sample with " \
    "replacement"


def sample_fewshot(items: Sequence[Datum], num_shots: int, seed: int | None = None, rng: random.Random | None = None,
                   repeat: bool = False, allow_fewer: bool = False, fewer_hint: str = FEWER_HINT) -> list[Datum]:
    """``num_shots`` items per label, drawn as Dassl's ``generate_fewshot_dataset`` draws them.

    For each label in first-appearance order: ``rng.sample(group, K)`` when the group has K items or more;
    otherwise ``rng.choices(group, k=K)`` with ``repeat``, the whole group with ``allow_fewer`` (Dassl's
    behaviour, with a warning), and a :class:`DataError` naming the class and its size by default.
    ``num_shots < 1`` (CoOp's ``-1``) returns all items. The RNG: ``rng`` if given, else a
    ``random.Random(seed)``; with neither, Python's global ``random`` (which is what Dassl uses).
    """
    num_shots = _check_shots(num_shots)
    if seed is not None and rng is not None:
        raise ConfigError("sample_fewshot: give seed or rng, not both")
    if not items:
        raise DataError("cannot sample a few-shot set from an empty list of images: the split has no classes")
    if num_shots < 1:
        return list(items)
    # The random module's own sample/choices draw from the global RNG, as Dassl's calls do.
    draw = rng if rng is not None else random.Random(seed) if seed is not None else random
    sampled: list[Datum] = []
    for label, group in split_by_label(items).items():
        if len(group) >= num_shots:
            sampled += draw.sample(group, num_shots)
        elif repeat:
            sampled += draw.choices(group, k=num_shots)
        elif allow_fewer:
            logger.warning("class %d (%s) has %d image(s), fewer than %d shots: all are kept", label,
                           group[0].classname, len(group), num_shots)
            sampled += group
        else:
            asked = f"num_shots={num_shots}" if fewer_hint == FEWER_HINT else f"the {num_shots} shots asked for"
            raise DataError(f"class {label} ({group[0].classname!r}) has {len(group)} image(s), fewer than {asked}; "
                            f"{fewer_hint}")
    return sampled


def fewshot_splits(splits: Splits, num_shots: int, seed: int, repeat: bool = False,
                   allow_fewer: bool = False, fewer_hint: str = FEWER_HINT) -> Splits:
    """The few-shot version of ``splits``: K shots per class of train, then ``min(K, 4)`` of val, test unchanged.

    Both draws come from one ``random.Random(seed)``, train first: the same calls as CoOp's dataset classes
    make on Python's global RNG after ``set_random_seed(seed)``, so the picks equal CoOp's when nothing
    else draws in between (true in CoOp's ``train.py`` when the split file exists). A data set whose val is
    its test set (ImageNet) keeps it whole, as CoOp does. ``num_shots < 1`` returns the splits unchanged.
    """
    num_shots = _check_shots(num_shots)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: {seed!r} must be an integer")
    if num_shots < 1:
        return make_splits(splits.train, splits.val, splits.test, splits.val_is_test)
    rng = random.Random(seed)
    try:
        train = sample_fewshot(splits.train, num_shots, rng=rng, repeat=repeat, allow_fewer=allow_fewer,
                               fewer_hint=fewer_hint)
    except DataError as exc:
        raise DataError(f"train split: {exc}") from None
    if splits.val_is_test:
        val = list(splits.val)
    elif splits.val:
        try:
            val = sample_fewshot(splits.val, min(num_shots, VAL_SHOTS_MAX), rng=rng, repeat=repeat,
                                 allow_fewer=allow_fewer, fewer_hint=fewer_hint)
        except DataError as exc:
            raise DataError(f"val split ({min(num_shots, VAL_SHOTS_MAX)} shots = min(K, 4)): {exc}") from None
    else:
        val = []
    return make_splits(train, val, splits.test, splits.val_is_test)


def _check_subsample(subsample: str) -> str:
    if subsample == "novel":
        return "new"
    if subsample not in SUBSAMPLES:
        raise ConfigError(f"subsample: {subsample!r} is not supported; choose one of {list(SUBSAMPLES)} "
                          "('novel' is accepted for 'new')")
    return subsample


def base_novel_labels(labels: Sequence[int] | set[int]) -> tuple[list[int], list[int]]:
    """The base and novel labels: the sorted unique labels, the first ``ceil(n / 2)`` base, the rest novel."""
    ordered = sorted(set(labels))
    if len(ordered) < 2:
        raise DataError(f"a base/novel split needs at least 2 classes, got {len(ordered)}")
    m = math.ceil(len(ordered) / 2)
    return ordered[:m], ordered[m:]


def subsample_classes(*splits_lists: Sequence[Datum], subsample: str = "all") -> list[list[Datum]]:
    """CoOp's ``subsample_classes``: every list filtered to the base (or new) classes and relabelled from 0.

    The classes come from the first list (the training split in CoOp): its sorted labels, the first
    ``ceil(n / 2)`` base and the rest new. ``all`` returns the lists unchanged.
    """
    subsample = _check_subsample(subsample)
    if not splits_lists:
        raise ConfigError("subsample_classes: give at least one list of items (the training split first)")
    if subsample == "all":
        return [list(items) for items in splits_lists]
    if not splits_lists[0]:
        raise DataError("cannot split classes into base and new: the first list (the training split) is empty")
    base, new = base_novel_labels({item.label for item in splits_lists[0]})
    relabel = {old: index for index, old in enumerate(base if subsample == "base" else new)}
    return [[Datum(item.impath, relabel[item.label], item.classname) for item in items if item.label in relabel]
            for items in splits_lists]


def base_novel_splits(splits: Splits, which: str) -> Splits:
    """``splits`` restricted to the base or novel (``new``) classes, relabelled from 0, with their class names.

    Classes are split on the training labels; apply it after :func:`fewshot_splits`, as CoOp does.
    """
    which = _check_subsample(which)
    train, val, test = subsample_classes(splits.train, splits.val, splits.test, subsample=which)
    return make_splits(train, val, test, splits.val_is_test)
