"""The few-shot sampler against a direct re-implementation of Dassl's global-RNG calls, and the base/novel split
against CoOp's ``subsample_classes``."""

from __future__ import annotations

import json
import logging
import math
import random
from collections import defaultdict

import pytest

from visionpeft.errors import ConfigError, DataError
from visionpeft.vla import fewshot
from visionpeft.vla.data import Datum, make_splits, read_split_zhou
from visionpeft.vla.fewshot import (
    SEEDS,
    base_novel_splits,
    fewshot_splits,
    sample_fewshot,
    split_by_label,
    subsample_classes,
)


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """The Dassl re-implementation seeds Python's global RNG; give other tests their state back."""
    state = random.getstate()
    yield
    random.setstate(state)


def dassl_generate_fewshot(data_source, num_shots, repeat=False):
    """Dassl's DatasetBase.generate_fewshot_dataset for one source, on the global RNG."""
    if num_shots < 1:
        return data_source
    tracker = defaultdict(list)
    for item in data_source:
        tracker[item.label].append(item)
    dataset = []
    for items in tracker.values():
        if len(items) >= num_shots:
            sampled = random.sample(items, num_shots)
        else:
            sampled = random.choices(items, k=num_shots) if repeat else items
        dataset.extend(sampled)
    return dataset


def coop_fewshot(train, val, num_shots, seed):
    """What CoOp's dataset classes do after train.py's set_random_seed(seed)."""
    random.seed(seed)
    train = dassl_generate_fewshot(train, num_shots)
    val = dassl_generate_fewshot(val, num_shots=min(num_shots, 4))
    return train, val


def coop_subsample(*args, subsample="all"):
    """CoOp's OxfordPets.subsample_classes."""
    if subsample == "all":
        return list(args)
    labels = sorted({item.label for item in args[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: y_new for y_new, y in enumerate(selected)}
    return [[Datum(i.impath, relabeler[i.label], i.classname) for i in ds if i.label in selected] for ds in args]


def interleaved(num_classes, per_class, prefix="train", order_seed=0):
    """Items of ``num_classes`` classes, shuffled so that labels first appear out of order."""
    items = [Datum(f"/data/{prefix}/{c}_{i}.jpg", c, f"class_{c}")
             for c in range(num_classes) for i in range(per_class)]
    random.Random(order_seed).shuffle(items)
    return items


def test_seeds_and_shots_of_the_protocol():
    assert SEEDS == (1, 2, 3) and fewshot.SHOTS == (1, 2, 4, 8, 16)


@pytest.mark.parametrize("seed", SEEDS)
def test_fewshot_splits_equal_dassls_global_rng_calls(seed):
    train, val, test = interleaved(12, 20), interleaved(12, 6, "val", 1), interleaved(12, 3, "test", 2)
    splits = make_splits(train, val, test)
    for shots in fewshot.SHOTS:
        expected_train, expected_val = coop_fewshot(train, val, shots, seed)
        got = fewshot_splits(splits, shots, seed)
        assert got.train == expected_train and got.val == expected_val and got.test == test
        assert len(got.train) == 12 * shots and len(got.val) == 12 * min(shots, 4)
        assert got.classnames == splits.classnames


def test_same_split_file_shots_and_seed_give_the_same_images(tmp_path):
    content = {split: [[f"c{label}/{split}_{i}.jpg", label, f"c{label}"] for i in range(n) for label in (2, 0, 1)]
               for split, n in (("train", 10), ("val", 5), ("test", 2))}
    (tmp_path / "split_zhou_X.json").write_text(json.dumps(content))
    first = fewshot_splits(read_split_zhou(tmp_path / "split_zhou_X.json", tmp_path, check_files=False), 4, 2)
    again = fewshot_splits(read_split_zhou(tmp_path / "split_zhou_X.json", tmp_path, check_files=False), 4, 2)
    other = fewshot_splits(read_split_zhou(tmp_path / "split_zhou_X.json", tmp_path, check_files=False), 4, 3)
    assert first == again and first.train != other.train
    # Labels in order of first appearance in the file (2, 0, 1), as Dassl's defaultdict keeps them.
    assert [d.label for d in first.train] == [2] * 4 + [0] * 4 + [1] * 4
    assert first.classnames == ["c0", "c1", "c2"]


def test_sample_fewshot_rng_options_and_first_appearance_order():
    items = interleaved(5, 7)
    first_seen = list(dict.fromkeys(d.label for d in items))
    assert list(split_by_label(items)) == first_seen
    sampled = sample_fewshot(items, 3, seed=11)
    assert [d.label for d in sampled] == [label for label in first_seen for _ in range(3)]
    assert sample_fewshot(items, 3, seed=11) == sampled
    assert sample_fewshot(items, 3, rng=random.Random(11)) == sampled
    random.seed(11)
    expected = dassl_generate_fewshot(items, 3)
    random.seed(11)
    assert sample_fewshot(items, 3) == expected == sampled  # no seed or rng: Python's global RNG, as Dassl
    assert sample_fewshot(items, -1) == items and sample_fewshot(items, 0) == items
    with pytest.raises(ConfigError, match="not both"):
        sample_fewshot(items, 3, seed=1, rng=random.Random(1))
    with pytest.raises(ConfigError, match="integer"):
        sample_fewshot(items, 2.5, seed=1)


def test_shots_larger_than_a_class(caplog):
    items = [Datum(f"/x/{i}.jpg", 0, "tabby") for i in range(5)] + [Datum(f"/y/{i}.jpg", 1, "sphynx") for i in range(2)]
    with pytest.raises(DataError, match=r"class 1 \('sphynx'\) has 2 image\(s\), fewer than num_shots=4"):
        sample_fewshot(items, 4, seed=1)
    with caplog.at_level(logging.WARNING, logger="visionpeft"):
        kept = sample_fewshot(items, 4, seed=1, allow_fewer=True)
    assert "class 1 (sphynx) has 2 image(s)" in caplog.text
    random.seed(1)
    assert kept == dassl_generate_fewshot(items, 4)  # Dassl keeps the small class whole
    random.seed(1)
    assert sample_fewshot(items, 4, seed=1, repeat=True) == dassl_generate_fewshot(items, 4, repeat=True)
    splits = make_splits(items, items[:1], items)
    with pytest.raises(DataError, match="^train split: class 1"):
        fewshot_splits(splits, 4, 1)
    splits = make_splits(items, [items[0], items[5]], items)
    with pytest.raises(DataError, match=r"^val split \(2 shots = min\(K, 4\)\): class 0 \('tabby'\) has 1"):
        fewshot_splits(splits, 2, 1)


def test_empty_class_list_is_an_error():
    with pytest.raises(DataError, match="empty list of images"):
        sample_fewshot([], 4, seed=1)
    with pytest.raises(DataError, match="train split is empty"):
        make_splits([], [], [])
    with pytest.raises(DataError, match="training split\\) is empty"):
        subsample_classes([], [], subsample="base")


def test_val_that_is_the_test_set_stays_whole():
    train, test = interleaved(4, 10), interleaved(4, 5, "test", 3)
    splits = make_splits(train, test, test, val_is_test=True)
    got = fewshot_splits(splits, 8, 1)
    random.seed(1)
    assert got.train == dassl_generate_fewshot(train, 8)  # ImageNet in CoOp: only train is sampled
    assert got.val == test and got.test == test and got.val_is_test
    assert fewshot_splits(splits, -1, 1).train == train


@pytest.mark.parametrize(("num_classes", "base"), [(37, 19), (10, 5), (101, 51), (397, 199), (47, 24), (2, 1)])
def test_base_novel_counts(num_classes, base):
    train = interleaved(num_classes, 2)
    base_train, = subsample_classes(train, subsample="base")
    new_train, = subsample_classes(train, subsample="new")
    assert len({d.label for d in base_train}) == base and len({d.label for d in new_train}) == num_classes - base
    assert sorted({d.label for d in new_train}) == list(range(num_classes - base))


def test_subsample_classes_equals_coops_and_relabels_from_zero():
    labels = [9, 2, 11, 5, 7]  # not contiguous, first seen out of order
    train = [Datum(f"/t/{y}_{i}.jpg", y, f"n{y}") for i in range(3) for y in labels]
    test = [Datum(f"/s/{y}.jpg", y, f"n{y}") for y in [*labels, 13]]  # 13 only in test: classes come from train
    for which in ("all", "base", "new"):
        assert subsample_classes(train, test, subsample=which) == coop_subsample(train, test, subsample=which)
    _, base_test = subsample_classes(train, test, subsample="base")
    assert {(d.label, d.classname) for d in base_test} == {(0, "n2"), (1, "n5"), (2, "n7")}
    new_train, new_test = subsample_classes(train, test, subsample="new")
    assert {(d.label, d.classname) for d in new_test} == {(0, "n9"), (1, "n11")}
    assert [d.impath for d in new_train] == [d.impath for d in train if d.label in (9, 11)]
    with pytest.raises(ConfigError, match="subsample"):
        subsample_classes(train, subsample="half")
    with pytest.raises(DataError, match="at least 2 classes"):
        subsample_classes(train[:1], subsample="base")


def test_base_novel_splits_after_fewshot():
    names = [f"breed_{c}" for c in range(37)]
    train = [Datum(f"/t/{c}_{i}.jpg", c, names[c]) for i in range(20) for c in range(37)]
    val = [Datum(f"/v/{c}_{i}.jpg", c, names[c]) for i in range(5) for c in range(37)]
    test = [Datum(f"/s/{c}_{i}.jpg", c, names[c]) for i in range(3) for c in range(37)]
    splits = fewshot_splits(make_splits(train, val, test), 16, 1)
    base, novel = base_novel_splits(splits, "base"), base_novel_splits(splits, "novel")
    assert base.classnames == names[:19] and novel.classnames == names[19:]
    assert len(base.train) == 19 * 16 and len(novel.test) == 18 * 3 and len(base.val) == 19 * 4
    expected = coop_subsample(splits.train, splits.val, splits.test, subsample="new")
    assert [novel.train, novel.val, novel.test] == expected
    assert base_novel_splits(splits, "all") == splits
    with pytest.raises(ConfigError, match="'novel' is accepted"):
        base_novel_splits(splits, "old")
