"""ViT data readers and transforms on real image files: VTAB-1k, FGVC JSON, image folders, video frames."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionpeft.errors import ConfigError, DataError
from visionpeft.vit import data
from visionpeft.vit.transforms import IMAGENET_MEAN, build_transform, normalization_for

pytest.importorskip("torchvision")

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def save_image(path: Path, colour=(255, 0, 0), size=(8, 8), mode="RGB") -> Path:
    """A small solid image; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else 128).save(path)
    return path


def noise_image(path: Path, seed: int, size=(48, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_vtab(task_dir: Path, counts=None, labels=(0, 1, 2)) -> Path:
    """A VTAB-1k task folder: JPEG images under images/<split>/ and the four split lists."""
    counts = counts or {"train800": 4, "val200": 2, "train800val200": 6, "test": 3}
    for split, count in counts.items():
        lines = []
        for i in range(count):
            label = labels[i % len(labels)]
            rel = f"images/{split}/{i:06d}.jpg"
            save_image(task_dir / rel, COLOURS[label % len(COLOURS)])
            lines.append(f"{rel} {label}")
        (task_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return task_dir


def make_fgvc(root: Path, image_dir: str, splits: dict[str, dict[str, int]]) -> Path:
    for split, entries in splits.items():
        for rel, class_id in entries.items():
            save_image(root / image_dir / rel, COLOURS[class_id % len(COLOURS)], mode="RGB")
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


FGVC_SPLITS = {
    "train": {"003.a/1.jpg": 3, "007.b/1.png": 7, "012.c/1.jpg": 12, "003.a/2.jpg": 3},
    "val": {"007.b/2.jpg": 7},
    "test": {"012.c/2.jpg": 12, "003.a/3.png": 3},
}


def make_clips(root: Path, frames_per_clip=(20, 20), labels=(0, 1), noise=False) -> Path:
    """Frame folders under root/clips/ and a list file root/train.txt."""
    lines = []
    for c, (count, label) in enumerate(zip(frames_per_clip, labels, strict=True)):
        for f in range(count):
            path = root / "clips" / f"clip{c}" / f"img_{f:05d}.jpg"
            # Frame f of a clip is encoded in its colour so tests can tell which frames were read.
            if noise:
                noise_image(path, seed=c)
            else:
                save_image(path, (f * 10, 0, 0))
        lines.append(f"clips/clip{c} {label}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root / "train.txt"


# -- VTAB-1k --


def test_vtab_reads_splits_labels_and_classes(tmp_path):
    task = make_vtab(tmp_path / "mytask")
    ds = data.VTAB1k(task, "train800")
    assert len(ds) == 4
    assert [label for _, label in ds.samples] == [0, 1, 2, 0]
    assert ds.classes == ["0", "1", "2"]
    image, label = ds[1]
    assert image.shape == (3, 8, 8) and label == 1
    assert image.dtype == torch.float32 and image[1].mean() > 0.9  # green square
    assert len(data.VTAB1k(task, "test.txt")) == 3
    assert ds.skipped == []


def test_vtab_known_task_uses_the_task_class_count(tmp_path):
    # sun397's 800 training images cannot show all 397 classes; the head must still have 397.
    ds = data.VTAB1k(make_vtab(tmp_path / "sun397"), "train800")
    assert len(ds.classes) == 397
    with pytest.raises(DataError, match="out of range for patch_camelyon"):
        data.VTAB1k(make_vtab(tmp_path / "patch_camelyon"), "train800")


def test_vtab_transform_resizes_straight(tmp_path):
    tf = build_transform("vtab", train=True, image_size=32, mean=IMAGENET_MEAN, std=(0.229, 0.224, 0.225))
    ds = data.VTAB1k(make_vtab(tmp_path / "t"), "train800", transform=tf)
    image, _ = ds[0]
    assert type(image) is torch.Tensor and image.shape == (3, 32, 32)
    # A red square normalised with ImageNet statistics: channel 0 = (1 - 0.485) / 0.229.
    assert image[0].mean().item() == pytest.approx((1 - 0.485) / 0.229, abs=0.05)


def test_vtab_unknown_split_lists_available(tmp_path):
    task = make_vtab(tmp_path / "t", counts={"train800": 2, "test": 2})
    with pytest.raises(DataError, match=r"'train1000'.*\['train800.txt', 'test.txt'\]"):
        data.VTAB1k(task, "train1000")
    with pytest.raises(ValueError, match="val200"):
        data.VTAB1k(task, "val200")


@pytest.mark.parametrize(("alias", "folder"), [
    ("cifar100", "cifar"), ("CIFAR-100", "cifar"), ("oxford_pet", "oxford_iiit_pet"), ("pets", "oxford_iiit_pet"),
    ("flowers102", "oxford_flowers102"), ("vtab-dtd", "dtd"),
])
def test_vtab_task_aliases_find_noah_folders(tmp_path, alias, folder):
    (tmp_path / folder).mkdir()
    assert data.vtab_task_dir(tmp_path, alias) == tmp_path / folder


def test_vtab_aliases_both_ways(tmp_path):
    (tmp_path / "oxford_pet").mkdir()
    assert data.vtab_task_dir(tmp_path, "oxford_iiit_pet") == tmp_path / "oxford_pet"
    assert data.canonical_vtab_task("oxford_iiit_pet") == data.canonical_vtab_task("oxford_pet") == "pets"
    assert data.canonical_vtab_task("cifar") == "cifar100"
    assert data.VTAB_NUM_CLASSES[data.canonical_vtab_task("cifar")] == 100
    assert sum(len(tasks) for tasks in data.VTAB_GROUPS.values()) == 19
    assert {t for tasks in data.VTAB_GROUPS.values() for t in tasks} == set(data.VTAB_NUM_CLASSES)
    with pytest.raises(DataError, match="tried.*folders present: \\['oxford_pet'\\]"):
        data.vtab_task_dir(tmp_path, "dtd")
    with pytest.raises(DataError, match="unknown VTAB-1k task 'imagenet'"):
        data.canonical_vtab_task("imagenet")


def test_bad_label_names_file_and_line(tmp_path):
    task = make_vtab(tmp_path / "t")
    (task / "train800.txt").write_text("images/train800/000000.jpg 0\nimages/train800/000001.jpg cat\n")
    with pytest.raises(DataError, match=r"train800\.txt:2: label 'cat'"):
        data.VTAB1k(task, "train800")
    (task / "train800.txt").write_text("images/train800/000000.jpg -1\n")
    with pytest.raises(DataError, match=r"train800\.txt:1: label '-1'"):
        data.VTAB1k(task, "train800")
    (task / "train800.txt").write_text("\nonlyonefield\n")
    with pytest.raises(DataError, match=r"train800\.txt:2: expected '<path> <label>'"):
        data.VTAB1k(task, "train800")


def test_missing_image_names_path(tmp_path):
    task = make_vtab(tmp_path / "t")
    (task / "images/train800/000002.jpg").unlink()
    with pytest.raises(DataError, match=r"cannot read image .*000002\.jpg: no such file; .*skip_bad=True"):
        data.VTAB1k(task, "train800")
    with pytest.raises(DataError, match=r"000002\.jpg: no such file; fix or remove it, or set data\.skip_bad: true"):
        data.VTAB1k(task, "train800", skip_hint="set data.skip_bad: true")


def test_corrupt_image_names_path_and_skip_bad_drops_it(tmp_path, caplog):
    task = make_vtab(tmp_path / "t")
    bad = task / "images/train800/000001.jpg"
    bad.write_bytes(b"this is not a jpeg at all" * 10)
    ds = data.VTAB1k(task, "train800")  # the file exists: found when read
    with pytest.raises(DataError, match=r"cannot read image .*000001\.jpg: .*skip_bad=True"):
        ds[1]
    (task / "images/train800/000003.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="visionpeft"):
        ds = data.VTAB1k(task, "train800", skip_bad=True)
    assert len(ds) == 2
    assert sorted(Path(p).name for p in ds.skipped) == ["000001.jpg", "000003.jpg"]
    assert "skipped 2 of 4" in caplog.text
    assert [ds[i][1] for i in range(len(ds))] == [0, 2]


def test_truncated_image_is_caught_by_skip_bad(tmp_path):
    task = make_vtab(tmp_path / "t")
    good = noise_image(task / "images/train800/000000.jpg", seed=0, size=(64, 64))
    good.write_bytes(good.read_bytes()[:200])
    ds = data.VTAB1k(task, "train800", skip_bad=True)
    assert len(ds) == 3 and len(ds.skipped) == 1


# -- FGVC --


def test_fgvc_cub_layout_and_contiguous_ids(tmp_path):
    root = make_fgvc(tmp_path / "CUB_200_2011", "images", FGVC_SPLITS)
    train = data.FGVC(root, "train", dataset="CUB")
    val = data.FGVC(root, "val", dataset="cub_200_2011")
    test = data.FGVC(root, "test", dataset="cub")
    assert train.classes == val.classes == test.classes == ["3", "7", "12"]
    assert [label for _, label in train.samples] == [0, 1, 2, 0]
    assert [label for _, label in val.samples] == [1]
    assert [label for _, label in test.samples] == [2, 0]
    assert all(Path(p).is_relative_to(root / "images") for p, _ in train.samples)
    image, label = test[1]
    assert image.shape == (3, 8, 8) and label == 0


def test_fgvc_ids_agree_when_a_split_lacks_classes(tmp_path):
    root = make_fgvc(tmp_path / "f", "", {"train": {"a.jpg": 7}, "test": {"b.jpg": 12, "c.jpg": 3}})
    train = data.FGVC(root, "train", dataset="OxfordFlower")
    assert train.classes == ["3", "7", "12"] and train.samples[0][1] == 1
    assert train.dataset == "OxfordFlowers"


def test_fgvc_flowers_and_cars_read_from_root_and_dogs_from_Images(tmp_path):
    flowers = make_fgvc(tmp_path / "flowers", "", FGVC_SPLITS)
    assert len(data.FGVC(flowers, "train", dataset="OxfordFlowers")) == 4
    assert len(data.FGVC(flowers, "train", dataset="stanfordcars")) == 4
    assert len(data.FGVC(flowers, "train")) == 4
    dogs = make_fgvc(tmp_path / "dogs", "Images", FGVC_SPLITS)
    assert all("/Images/" in p for p, _ in data.FGVC(dogs, "test", dataset="StanfordDogs").samples)
    assert data.FGVC_NUM_CLASSES == {"CUB": 200, "nabirds": 555, "OxfordFlowers": 102, "StanfordDogs": 120,
                                     "StanfordCars": 196}


def test_fgvc_fgvc_transform_crops(tmp_path):
    root = make_fgvc(tmp_path / "f", "", FGVC_SPLITS)
    train = data.FGVC(root, "train", transform=build_transform("fgvc", train=True, image_size=32))
    test = data.FGVC(root, "test", transform=build_transform("fgvc", train=False, image_size=32))
    assert train[0][0].shape == test[0][0].shape == (3, 32, 32)


def test_fgvc_percentage_split_and_errors(tmp_path):
    root = make_fgvc(tmp_path / "f", "images", {**FGVC_SPLITS, "train_10": {"003.a/1.jpg": 3}})
    assert len(data.FGVC(root, "train_10", dataset="nabirds")) == 1
    with pytest.raises(DataError, match=r"'train_50'.*\['test.json', 'train.json', 'train_10.json', 'val.json'\]"):
        data.FGVC(root, "train_50")
    with pytest.raises(DataError, match="unknown FGVC data set 'imagenet'"):
        data.FGVC(root, "train", dataset="imagenet")
    (root / "val.json").write_text(json.dumps({"x.jpg": "cat"}))
    with pytest.raises(DataError, match=r"val\.json:entry 'x.jpg': label 'cat'"):
        data.FGVC(root, "train")


# -- image folder --


def test_image_folder(tmp_path):
    for name, colour in (("b_dog", 1), ("a_cat", 0)):
        for i, ext in enumerate(("jpg", "PNG", "bmp")):
            save_image(tmp_path / name / f"{i}.{ext}", COLOURS[colour])
    save_image(tmp_path / "a_cat" / "nested" / "3.webp", COLOURS[0])
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    ds = data.ImageFolderDataset(tmp_path, transform=build_transform("vtab", train=False, image_size=16))
    assert ds.classes == ["a_cat", "b_dog"]
    assert len(ds) == 7
    assert sum(label for _, label in ds.samples) == 3
    image, label = ds[len(ds) - 1]
    assert image.shape == (3, 16, 16) and label == 1
    with pytest.raises(DataError, match="no class subfolders"):
        data.ImageFolderDataset(tmp_path / "a_cat" / "nested")


def test_an_evaluation_image_folder_keeps_the_training_labels(tmp_path):
    """A val folder lacking a class keeps the training labels; one with a class training lacks is refused."""
    for name in ("ant", "bee", "cat"):
        save_image(tmp_path / "train" / name / "0.png")
    save_image(tmp_path / "val" / "ant" / "0.png")
    save_image(tmp_path / "val" / "cat" / "0.png")
    train = data.ImageFolderDataset(tmp_path / "train")
    val = data.ImageFolderDataset(tmp_path / "val", classes=train.classes, classes_source=tmp_path / "train")
    # Labelled on its own, val would call cat 1 (bee's label): accuracy on shifted labels.
    assert val.classes == ["ant", "bee", "cat"] and [label for _, label in val.samples] == [0, 2]
    save_image(tmp_path / "val" / "dog" / "0.png")
    with pytest.raises(DataError, match=r"\['dog'\] of .*val are not classes of the training split .*train \(3"):
        data.ImageFolderDataset(tmp_path / "val", classes=train.classes, classes_source=tmp_path / "train")


def test_evaluation_labels_beyond_the_training_classes_name_file_and_line(tmp_path):
    """Video lists and FGVC files of an evaluation split are bounded by the training split's classes."""
    list_file = make_clips(tmp_path, frames_per_clip=(2, 2), labels=(0, 1))
    (tmp_path / "val.txt").write_text("clips/clip0 0\n\nclips/clip1 2\n")
    assert data.VideoFrames(tmp_path, list_file, num_classes=3).classes == ["0", "1", "2"]
    with pytest.raises(DataError, match=r"val\.txt:3: label 2 is not a class of .*train\.txt, which has 2 classes"):
        data.VideoFrames(tmp_path, tmp_path / "val.txt", num_classes=2, classes_source=str(list_file))
    root = make_fgvc(tmp_path / "f", "", {"train": {"a.jpg": 7, "b.jpg": 3}, "train_10": {"c.jpg": 5}})
    train = data.FGVC(root, "train")
    assert [label for _, label in data.FGVC(root, "train", classes=train.classes).samples] == [1, 0]
    with pytest.raises(DataError, match=r"train_10\.json:entry 'c\.jpg': class id 5 is not a class of the training"):
        data.FGVC(root, "train_10", classes=train.classes)
    # The usual layout: test.json beside train.json, with a class train.json lacks.
    root = make_fgvc(tmp_path / "g", "", {"train": {"a.jpg": 7, "b.jpg": 3}, "test": {"c.jpg": 5, "d.jpg": 3}})
    train = data.FGVC(root, "train", own_classes=True)  # as the vit task reads a training split
    assert train.classes == ["3", "7"]  # not widened by test.json
    with pytest.raises(DataError, match=r"test\.json:entry 'c\.jpg': class id 5 is not a class of the training"):
        data.FGVC(root, "test", classes=train.classes)


# -- video --


def test_sample_frame_indices_uniform():
    assert data.sample_frame_indices(20, 8, "uniform") == [1, 3, 6, 8, 11, 13, 16, 18]
    assert data.sample_frame_indices(20, 4, "uniform") == [2, 7, 12, 17]
    gen = torch.Generator().manual_seed(0)
    picked = data.sample_frame_indices(20, 8, "uniform", train=True, generator=gen)
    # One frame inside each 2.5-frame segment.
    assert all(int(2.5 * i) <= f <= int(2.5 * (i + 1)) for i, f in enumerate(picked))
    assert data.sample_frame_indices(3, 6, "uniform") == [0, 0, 1, 1, 2, 2]


def test_sample_frame_indices_stride():
    assert data.sample_frame_indices(20, 4, "stride", stride=4) == [3, 7, 11, 15]
    starts = {data.sample_frame_indices(20, 4, "stride", stride=4, train=True,
                                        generator=torch.Generator().manual_seed(s))[0] for s in range(40)}
    assert starts <= set(range(8)) and len(starts) > 3
    # The window is longer than the clip: the last frame repeats.
    assert data.sample_frame_indices(20, 8, "stride", stride=4) == [0, 4, 8, 12, 16, 19, 19, 19]
    with pytest.raises(ConfigError, match="sampling"):
        data.sample_frame_indices(20, 4, "random")


def _frame_ids(clip: torch.Tensor) -> list[int]:
    """The frame numbers encoded as red = 10 * frame by make_clips."""
    return [round(v * 255 / 10) for v in clip[:, 0].mean(dim=(1, 2)).tolist()]


def test_video_frames_deterministic_at_test(tmp_path):
    list_file = make_clips(tmp_path, frames_per_clip=(20, 5), labels=(0, 3))
    ds = data.VideoFrames(tmp_path, list_file, num_frames=8)
    assert len(ds) == 2 and ds.classes == ["0", "1", "2", "3"]
    clip, label = ds[0]
    assert clip.shape == (8, 3, 8, 8) and label == 0
    assert _frame_ids(clip) == [1, 3, 6, 8, 11, 13, 16, 18]
    ds.set_epoch(5)
    assert torch.equal(ds[0][0], clip)
    assert _frame_ids(ds[1][0]) == data.sample_frame_indices(5, 8)
    strided = data.VideoFrames(tmp_path, "train.txt", num_frames=4, sampling="stride", stride=4)
    assert _frame_ids(strided[0][0]) == [3, 7, 11, 15]


def test_video_frames_training_offsets_change_per_epoch(tmp_path):
    list_file = make_clips(tmp_path)
    ds = data.VideoFrames(tmp_path, list_file, num_frames=8, train=True, seed=1)
    first = _frame_ids(ds[0][0])
    assert first == _frame_ids(ds[0][0])  # same epoch, same item: reproducible
    per_epoch = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        per_epoch.append(tuple(_frame_ids(ds[0][0])))
    assert per_epoch[0] == tuple(first)
    assert len(set(per_epoch)) > 1


def test_video_same_augmentation_for_all_frames(tmp_path):
    list_file = make_clips(tmp_path, frames_per_clip=(6, 6, 6, 6), labels=(0, 1, 0, 1), noise=True)
    tf = build_transform("fgvc", train=True, image_size=32)
    ds = data.VideoFrames(tmp_path, list_file, num_frames=4, transform=tf, train=True)
    outputs = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            clip, _ = ds[i]
            assert clip.shape == (4, 3, 32, 32)
            # Every frame of a clip is the same picture, so the same crop and flip give equal frames.
            assert all(torch.equal(clip[0], clip[t]) for t in range(1, 4))
            outputs.append(clip[0])
    # Clips 0 and 2 share their picture: across epochs the augmentation differs somewhere.
    assert any(not torch.equal(outputs[0], outputs[k]) for k in (4, 8))


def test_video_bad_inputs(tmp_path, caplog):
    list_file = make_clips(tmp_path, frames_per_clip=(4, 4), labels=(0, 1))
    with open(list_file, "a") as f:
        f.write("clips/missing 1\n")
    with pytest.raises(DataError, match=r"clips/missing listed in .*train\.txt does not exist"):
        data.VideoFrames(tmp_path, list_file)
    with pytest.raises(DataError, match="fix the list or set data.skip_bad: true"):
        data.VideoFrames(tmp_path, list_file, skip_hint="set data.skip_bad: true")
    (tmp_path / "clips/clip1/img_00002.jpg").write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="visionpeft"):
        ds = data.VideoFrames(tmp_path, list_file, num_frames=2, skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 2 and "skipped 2 of 3" in caplog.text
    list_file.write_text("clips/clip0 0\nclips/clip1 dog\n")
    with pytest.raises(DataError, match=r"train\.txt:2: label 'dog'"):
        data.VideoFrames(tmp_path, list_file)
    with pytest.raises(ConfigError, match="num_frames"):
        data.VideoFrames(tmp_path, list_file, num_frames=0)


# -- transforms --


def test_build_transform_kinds():
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    assert build_transform("vtab", train=False, image_size=32)(image).shape == (3, 32, 32)
    assert build_transform("fgvc", train=False, image_size=16)(image).shape == (3, 16, 16)
    raw = build_transform("none", train=True, mean=None, std=None)(image)
    assert raw.shape == (3, 20, 40) and raw.max().item() == 1.0
    inception = build_transform("none", train=False, mean=(0.5,) * 3, std=(0.5,) * 3)(image)
    assert inception.max().item() == 1.0
    with pytest.raises(ConfigError, match="choose one of"):
        build_transform("autoaugment", train=True)
    with pytest.raises(ConfigError, match="interpolation"):
        build_transform("vtab", train=True, interpolation="magic")


def test_normalization_for():
    class Backbone(torch.nn.Linear):
        pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}

    wrapped = torch.nn.Sequential(Backbone(2, 2))
    assert normalization_for(wrapped) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert normalization_for(torch.nn.Linear(2, 2)) == normalization_for(None, "imagenet")
    assert normalization_for(None) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalization_for(wrapped, "inception") == ((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ConfigError, match="normalization"):
        normalization_for(None, "clip")
