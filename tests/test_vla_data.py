"""vla data readers on real files (CoOp split files, ImageNet and FGVCAircraft trees, image folders), the
CLIP transforms and the zero-shot templates."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from visionpeft.errors import ConfigError, DataError
from visionpeft.vla import data, templates
from visionpeft.vla.data import Datum, ImageDataset
from visionpeft.vla.transforms import build_transform, clip_mean_std, model_preprocess

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def save_image(path: Path, colour=(255, 0, 0), size=(8, 8)) -> Path:
    """A small solid image; JPEG or PNG from the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def noise_image(path: Path, seed: int, size=(40, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_split(path: Path, image_dir: Path, classes: list[str], counts=(3, 2, 2), ext=".jpg") -> dict:
    """A split_zhou JSON over real images ``image_dir/<class>/<split>_<i>.ext``; returns its content."""
    content = {}
    for split, count in zip(("train", "val", "test"), counts, strict=True):
        entries = []
        for i in range(count):
            for label, name in enumerate(classes):
                rel = f"{name}/{split}_{i}{ext}"
                save_image(image_dir / rel, COLOURS[label % len(COLOURS)])
                entries.append([rel, label, name])
        content[split] = entries
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return content


EUROSAT = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake"]
EUROSAT_NAMES = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
                 "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]


def make_eurosat(root: Path) -> dict:
    """``root/eurosat/2750/<folder>/...`` and ``split_zhou_EuroSAT.json`` naming classes as CoOp's file does."""
    folder = root / "eurosat"
    content = write_split(folder / "split_zhou_EuroSAT.json", folder / "2750", EUROSAT)
    for split in content.values():
        for entry in split:
            entry[2] = EUROSAT_NAMES[entry[1]]
    (folder / "split_zhou_EuroSAT.json").write_text(json.dumps(content))
    return content


# -- split_zhou files and load_dataset --


def test_read_split_zhou_joins_paths_keeps_order_and_names(tmp_path):
    content = write_split(tmp_path / "split.json", tmp_path / "imgs", ["cat", "dog", "apple_pie"])
    splits = data.read_split_zhou(tmp_path / "split.json", tmp_path / "imgs")
    assert [(d.impath, d.label, d.classname) for d in splits.train] == [
        (str(tmp_path / "imgs" / rel), label, name) for rel, label, name in content["train"]]
    assert len(splits.val) == 6 and len(splits.test) == 6
    assert splits.classnames == ["cat", "dog", "apple_pie"] and splits.num_classes == 3
    assert not splits.val_is_test
    assert data.prompt_classname(splits.classnames[2]) == "apple pie"


def test_read_split_zhou_converts_labels_and_rejects_bad_entries(tmp_path):
    save_image(tmp_path / "a.jpg")
    good = {"train": [["a.jpg", "0", "a"]], "val": [], "test": [["a.jpg", 0, "a"]]}
    (tmp_path / "s.json").write_text(json.dumps(good))
    assert data.read_split_zhou(tmp_path / "s.json", tmp_path).train == [Datum(str(tmp_path / "a.jpg"), 0, "a")]
    cases = {
        "not an object": [1, 2],
        "no test": {"train": [], "val": []},
        "short entry": {"train": [["a.jpg", 0]], "val": [], "test": []},
        "label x": {"train": [["a.jpg", "x", "a"]], "val": [], "test": []},
        "empty train": {"train": [], "val": [], "test": [["a.jpg", 0, "a"]]},
        "test label unknown": {"train": [["a.jpg", 0, "a"]], "val": [], "test": [["a.jpg", 1, "b"]]},
        "two names": {"train": [["a.jpg", 0, "a"], ["a.jpg", 0, "b"]], "val": [], "test": []},
        "gap": {"train": [["a.jpg", 0, "a"], ["a.jpg", 2, "c"]], "val": [], "test": []},
    }
    messages = {}
    for name, content in cases.items():
        (tmp_path / "bad.json").write_text(json.dumps(content))
        with pytest.raises(DataError) as info:
            data.read_split_zhou(tmp_path / "bad.json", tmp_path)
        messages[name] = str(info.value)
    assert all("'train', 'val' and 'test'" in messages[k] for k in ("not an object", "no test"))
    assert "train[0]" in messages["short entry"] and "'x'" in messages["label x"]
    assert "train split is empty" in messages["empty train"]
    assert "label 1" in messages["test label unknown"] and "'a' and 'b'" in messages["two names"]
    assert "labels [1] have no image" in messages["gap"]
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        data.read_split_zhou(tmp_path / "broken.json", tmp_path)


def test_load_dataset_eurosat_in_coop_layout(tmp_path, caplog):
    content = make_eurosat(tmp_path)
    with caplog.at_level(logging.WARNING, logger="visionpeft"):
        splits = data.load_dataset("EuroSAT", tmp_path)
    assert not caplog.records  # 10 classes: the protocol's count
    assert splits.classnames == EUROSAT_NAMES
    assert splits.train[0].impath == str(tmp_path / "eurosat" / "2750" / content["train"][0][0])
    assert [len(splits.train), len(splits.val), len(splits.test)] == [30, 20, 20]
    # Any spelling, and the data set's own folder as the root, give the same splits.
    assert data.load_dataset("eurosat", tmp_path / "eurosat") == splits


def test_load_dataset_stanford_cars_reads_images_from_the_dataset_folder(tmp_path, caplog):
    folder = tmp_path / "stanford_cars"
    write_split(folder / "split_zhou_StanfordCars.json", folder, ["2012 Tesla Model S Sedan", "2007 Audi S4"],
                counts=(2, 1, 1))
    with caplog.at_level(logging.WARNING, logger="visionpeft"):
        splits = data.load_dataset("StanfordCars", tmp_path)
    assert splits.train[0].impath == str(folder / "2012 Tesla Model S Sedan" / "train_0.jpg")
    assert "StanfordCars has 2 classes" in caplog.text and "196" in caplog.text


def test_load_dataset_errors_say_where_files_belong(tmp_path):
    with pytest.raises(DataError, match=r"caltec.*did you mean 'Caltech101'\?") as info:
        data.load_dataset("caltec", tmp_path)
    assert "OxfordPets" in str(info.value)  # the known names are listed
    with pytest.raises(DataError, match="unknown data set 'zzzz'. Known data sets"):
        data.canonical_dataset("zzzz")
    with pytest.raises(DataError, match=r"caltech-101.*101_ObjectCategories.*split_zhou_Caltech101.json.*DATASETS.md"):
        data.load_dataset("Caltech101", tmp_path)
    (tmp_path / "caltech-101" / "101_ObjectCategories").mkdir(parents=True)
    with pytest.raises(DataError, match=r"split_zhou_Caltech101.json not found.*\$DATA/caltech-101/"):
        data.load_dataset("Caltech101", tmp_path)
    folder = tmp_path / "caltech-101"
    write_split(folder / "split_zhou_Caltech101.json", folder / "101_ObjectCategories", ["face", "leopard"],
                counts=(2, 1, 1))
    missing = tmp_path / "caltech-101" / "101_ObjectCategories" / "leopard" / "test_0.jpg"
    missing.unlink()
    with pytest.raises(DataError, match=f"image {missing} of the test split.*does not exist"):
        data.load_dataset("Caltech101", tmp_path)
    with pytest.raises(DataError, match="or set data.skip_bad: true to drop missing images"):
        data.load_dataset("Caltech101", tmp_path, skip_hint="set data.skip_bad: true")
    splits = data.load_dataset("Caltech101", tmp_path, check_files=False)
    assert len(splits.test) == 2


def test_dataset_table_follows_coop_layout():
    assert list(data.DATASETS) == ["ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101",
                                   "FGVCAircraft", "SUN397", "DescribableTextures", "EuroSAT", "UCF101"]
    layout = {name: (i.folder, i.image_dir, i.split_file, i.num_classes) for name, i in data.DATASETS.items()}
    assert layout == {
        "ImageNet": ("imagenet", "images", None, 1000),
        "Caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", 100),
        "OxfordPets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", 37),
        "StanfordCars": ("stanford_cars", "", "split_zhou_StanfordCars.json", 196),
        "OxfordFlowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", 102),
        "Food101": ("food-101", "images", "split_zhou_Food101.json", 101),
        "FGVCAircraft": ("fgvc_aircraft", "images", None, 100),
        "SUN397": ("sun397", "SUN397", "split_zhou_SUN397.json", 397),
        "DescribableTextures": ("dtd", "images", "split_zhou_DescribableTextures.json", 47),
        "EuroSAT": ("eurosat", "2750", "split_zhou_EuroSAT.json", 10),
        "UCF101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", 101),
    }
    assert all(info.template in templates.CUSTOM_TEMPLATES for info in data.DATASETS.values())
    assert data.canonical_dataset("DTD") == "DescribableTextures" and data.canonical_dataset("food-101") == "Food101"


def test_imagenet_tree_with_classnames_txt(tmp_path):
    folder = tmp_path / "imagenet"
    wnids = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
    for split, count in (("train", 3), ("val", 2)):
        for k, wnid in enumerate(sorted(wnids, reverse=True)):
            for i in range(count):
                save_image(folder / "images" / split / wnid / f"{wnid}_{i}.JPEG", COLOURS[k])
    (folder / "images" / "train" / "n01440764" / "notes.txt").write_text("not an image")
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in wnids.items()))
    splits = data.load_dataset("imagenet", tmp_path)
    assert splits.classnames == ["tench", "goldfish", "great white shark"]
    assert splits.val_is_test and splits.val == splits.test and len(splits.test) == 6
    assert [d.label for d in splits.train] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert splits.train[1].impath == str(folder / "images" / "train" / "n01440764" / "n01440764_1.JPEG")
    (folder / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    with pytest.raises(DataError, match=r"\['n01484850'\].*not in"):
        data.load_dataset("ImageNet", tmp_path)
    (folder / "classnames.txt").unlink()
    with pytest.raises(DataError, match="classnames.txt"):
        data.load_dataset("ImageNet", tmp_path)


def test_fgvc_aircraft_reads_its_own_variant_lists(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    lists = {"train": [("0001", "Cessna 172"), ("0002", "707-320"), ("0003", "A300B4")],
             "val": [("0004", "A300B4")], "test": [("0005", "Cessna 172"), ("0006", "707-320")]}
    for split, rows in lists.items():
        (folder / f"images_variant_{split}.txt").write_text("".join(f"{i} {v}\n" for i, v in rows))
        for image_id, _ in rows:
            save_image(folder / "images" / f"{image_id}.jpg")
    splits = data.load_dataset("FGVCAircraft", tmp_path)
    assert [(Path(d.impath).name, d.label, d.classname) for d in splits.train] == [
        ("0001.jpg", 2, "Cessna 172"), ("0002.jpg", 0, "707-320"), ("0003.jpg", 1, "A300B4")]
    assert splits.classnames == variants
    (folder / "images_variant_val.txt").write_text("0004 A380\n")
    with pytest.raises(DataError, match=r"images_variant_val.txt:1: variant 'A380'"):
        data.load_dataset("FGVCAircraft", tmp_path)


# -- class names and image folders --


def test_class_name_rules():
    assert data.pets_classname("american_pit_bull_terrier_12.jpg") == "american_pit_bull_terrier"
    assert data.pets_classname("Abyssinian_100") == "abyssinian"
    assert data.cars_classname("Tesla Model S Sedan 2012") == "2012 Tesla Model S Sedan"
    assert data.sun397_classname("a/apartment_building/outdoor") == "outdoor apartment_building"
    assert data.sun397_classname("/a/abbey") == "abbey"
    assert data.ucf101_classname("ApplyEyeMakeup") == "Apply_Eye_Makeup"
    assert data.folder_classname("Caltech101", "BACKGROUND_Google") is None
    assert data.folder_classname("caltech-101", "Faces") == "face"
    assert data.folder_classname("EuroSAT", "SeaLake") == "Sea or Lake"
    assert data.folder_classname("UCF101", "YoYo") == "Yo_Yo"
    assert data.folder_classname(None, "airplanes") == "airplanes"
    assert data.prompt_classname("Apply_Eye_Makeup") == "Apply Eye Makeup"


def test_read_imagefolder_sorted_classes_and_caltech_rules(tmp_path):
    root = tmp_path / "101_ObjectCategories"
    for k, name in enumerate(["airplanes", "BACKGROUND_Google", "Faces", "Faces_easy", "accordion"]):
        save_image(root / name / "b.png", COLOURS[k])
        save_image(root / name / "a.jpg", COLOURS[k])
    save_image(root / "accordion" / "deeper" / "c.jpg")
    (root / "accordion" / ".hidden.jpg").write_bytes(b"")
    items, names = data.read_imagefolder(root)
    assert names == ["BACKGROUND_Google", "Faces", "Faces_easy", "accordion", "airplanes"]
    items, names = data.read_imagefolder(root, dataset="Caltech101")
    assert names == ["face", "accordion", "airplane"]
    assert [(Path(d.impath).relative_to(root).as_posix(), d.label) for d in items] == [
        ("Faces/a.jpg", 0), ("Faces/b.png", 0), ("accordion/a.jpg", 1), ("accordion/b.png", 1),
        ("accordion/deeper/c.jpg", 1), ("airplanes/a.jpg", 2), ("airplanes/b.png", 2)]
    with pytest.raises(DataError, match="no class subfolders"):
        data.read_imagefolder(root / "Faces")


def test_imagefolder_splits(tmp_path):
    for split in ("train", "test"):
        for k, name in enumerate(["dog", "cat"]):
            save_image(tmp_path / split / name / f"{split}.jpg", COLOURS[k])
    splits = data.imagefolder_splits(tmp_path)
    assert splits.classnames == ["cat", "dog"] and splits.val_is_test and splits.val == splits.test
    save_image(tmp_path / "val" / "dog" / "v.jpg")
    splits = data.imagefolder_splits(tmp_path)
    assert not splits.val_is_test and splits.val == [Datum(str(tmp_path / "val" / "dog" / "v.jpg"), 1, "dog")]
    save_image(tmp_path / "val" / "horse" / "v.jpg")
    with pytest.raises(DataError, match=r"\['horse'\].*not among the training classes"):
        data.imagefolder_splits(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="no training folder"):
        data.imagefolder_splits(tmp_path / "nope")
    with pytest.raises(DataError, match=r"class folder .*train/empty has no images"):
        data.imagefolder_splits(tmp_path, val=None)


def test_imagefolder_splits_need_only_the_folders_the_run_uses(tmp_path):
    for split in ("train", "val"):
        for k, name in enumerate(["dog", "cat"]):
            save_image(tmp_path / split / name / f"{split}.jpg", COLOURS[k])
    splits = data.imagefolder_splits(tmp_path, evaluate="val")
    assert splits.test == [] and [(Path(d.impath).parent.name, d.label) for d in splits.val] == [("cat", 0), ("dog", 1)]
    with pytest.raises(DataError, match=r"no test folder .*test, the split the run evaluates on; .*\['train', 'val'\]"):
        data.imagefolder_splits(tmp_path)
    for name in ("dog", "cat"):
        (tmp_path / "val" / name / "val.jpg").rename(tmp_path / "train" / name / "more.jpg")
        (tmp_path / "val" / name).rmdir()
    (tmp_path / "val").rmdir()
    splits = data.imagefolder_splits(tmp_path, evaluate=None)
    assert splits.val == splits.test == [] and len(splits.train) == 4
    with pytest.raises(DataError, match=r"no val folder .*val, the split the run evaluates on"):
        data.imagefolder_splits(tmp_path, evaluate="val")


def test_class_names_clip_reads_as_one_are_refused_where_they_come_from(tmp_path):
    """'_' reads as a space and CLIP's tokenizer lower-cases: such names would give identical prompts."""
    write_split(tmp_path / "split.json", tmp_path / "imgs", ["cat", "apple_pie", "Apple  Pie"], counts=(1, 0, 0))
    with pytest.raises(DataError, match=r"split\.json: label 1 'apple_pie' \(e\.g\. .*\) and label 2 'Apple  Pie' "
                                        r"\(e\.g\. .*\) of the train split are one class name to CLIP"):
        data.read_split_zhou(tmp_path / "split.json", tmp_path / "imgs")
    for name in ("Cat", "cat", "dog"):
        save_image(tmp_path / "folder" / "train" / name / "0.jpg")
        save_image(tmp_path / "folder" / "test" / name / "0.jpg")
    with pytest.raises(DataError, match=r"label 0 'Cat' \(e\.g\. .*train/Cat/0\.jpg\) and label 1 'cat'"):
        data.imagefolder_splits(tmp_path / "folder")
    folder = tmp_path / "imagenet"
    wnids = {"n03773504": "missile", "n04008634": "Missile", "n04355933": "sunglass"}
    for split in ("train", "val"):
        for wnid in wnids:
            save_image(folder / "images" / split / wnid / f"{wnid}_0.JPEG")
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in wnids.items()))
    with pytest.raises(DataError, match=r"classnames\.txt: line 1 \(n03773504 'missile'\) and line 2 \(n04008634 "
                                        r"'Missile'\) are one class name to CLIP"):
        data.load_dataset("imagenet", tmp_path)


# -- images, transforms --


def test_image_dataset_tensors_and_bad_images(tmp_path, caplog):
    good = [Datum(str(save_image(tmp_path / f"{i}.png", COLOURS[i])), i, str(i)) for i in range(2)]
    item, label = ImageDataset(good)[1]
    assert label == 1 and item.shape == (3, 8, 8) and torch.equal(item[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    items = [*good, Datum(str(corrupt), 0, "0")]
    dataset = ImageDataset(items)
    with pytest.raises(DataError, match=f"cannot read image {corrupt}"):
        dataset[2]
    with caplog.at_level(logging.WARNING, logger="visionpeft"):
        dataset = ImageDataset(items, skip_bad=True, source="test split")
    assert len(dataset) == 2 and dataset.skipped == [str(corrupt)]
    assert "skipped 1 of 3 unreadable image(s) in test split" in caplog.text
    with pytest.raises(DataError, match="nowhere.jpg: no such file"):
        ImageDataset([Datum(str(tmp_path / "nowhere.jpg"), 0, "0")])
    with pytest.raises(DataError, match="nowhere.jpg: no such file; fix or remove it, or set data.skip_bad: true"):
        ImageDataset([Datum(str(tmp_path / "nowhere.jpg"), 0, "0")], skip_hint="set data.skip_bad: true")
    # A truncated PNG opens but fails to decode: skip_bad decodes every image to find it.
    png = noise_image(tmp_path / "t.png", 0)
    png.write_bytes(png.read_bytes()[:-60])
    assert ImageDataset([Datum(str(png), 0, "0"), good[0]], skip_bad=True).skipped == [str(png)]


def test_transforms_match_dassl_torchvision_pipeline(tmp_path):
    image = Image.open(noise_image(tmp_path / "x.png", 1, size=(40, 24))).convert("RGB")
    mean, std = clip_mean_std()
    assert mean == tuple(open_clip.OPENAI_DATASET_MEAN) and std == tuple(open_clip.OPENAI_DATASET_STD)
    bicubic = T.InterpolationMode.BICUBIC
    dassl_test = T.Compose([T.Resize(16, interpolation=bicubic), T.CenterCrop(16), T.ToTensor(),
                            T.Normalize(mean, std)])
    ours = build_transform(train=False, image_size=16)(image)
    assert ours.shape == (3, 16, 16)
    torch.testing.assert_close(ours, dassl_test(image), atol=1e-6, rtol=0)
    dassl_train = T.Compose([T.RandomResizedCrop(16, scale=(0.08, 1.0), interpolation=bicubic),
                             T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    train = build_transform(train=True, image_size=16)
    for seed in range(4):
        torch.manual_seed(seed)
        expected = dassl_train(image)
        torch.manual_seed(seed)
        torch.testing.assert_close(train(image), expected, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="image_size"):
        build_transform(True, image_size=0)
    with pytest.raises(ConfigError, match="give both"):
        build_transform(True, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="interpolation"):
        build_transform(False, interpolation="sinc")


def test_model_preprocess_reads_open_clip_config():
    from tiny_models import tiny_clip

    size, mean, std = model_preprocess(tiny_clip())
    assert size == 32 and mean == tuple(open_clip.OPENAI_DATASET_MEAN) and std == tuple(open_clip.OPENAI_DATASET_STD)


# -- templates --

# reference/vla.md section 1.6, CoOp trainers/zsclip.py.
REFERENCE_TEMPLATES = {
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
# CoOp trainers/imagenet_templates.py IMAGENET_TEMPLATES_SELECT.
COOP_SELECT = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
               "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


def test_custom_templates_match_reference_table():
    assert templates.CUSTOM_TEMPLATES == REFERENCE_TEMPLATES
    assert templates.template_for("dtd") == "{} texture."
    assert templates.template_for("ImageNetV2") == "a photo of a {}."
    assert templates.template_for(None) == "a photo of a {}."
    with pytest.raises(DataError, match="did you mean 'EuroSAT'"):
        templates.template_for("EuroSet")


def test_open_clip_ensembles_and_zeroshotclip2_rule():
    simple = templates.simple_templates()
    assert simple == COOP_SELECT and templates.templates_for(None, "simple") == COOP_SELECT
    assert templates.format_templates(simple, "x") == [t("x") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES]
    assert templates.format_templates(open_clip.SIMPLE_IMAGENET_TEMPLATES, "x") == [t.format("x") for t in simple]
    openai = templates.templates_for(None, "openai")
    assert len(openai) == 80 and openai[0] == "a bad photo of a {}." and openai[-1] == "a tattoo of the {}."
    assert templates.format_templates(openai, "x") == [t("x") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert len(templates.ensemble_templates("ImageNet")) == 7
    eurosat = templates.ensemble_templates("EuroSAT")
    assert len(eurosat) == 8 and eurosat[-1] == "a centered satellite photo of {}."
    assert len(templates.ensemble_templates("EuroSAT")) == 8  # no growth across calls (CoOp's class attribute)
    assert len(templates.ensemble_templates("ImageNetR")) == 8  # CoOp adds it for every name but 'ImageNet'
    assert templates.format_templates(["a photo of {}, a type of food."], "apple_pie") == [
        "a photo of apple pie, a type of food."]
    with pytest.raises(ConfigError, match="exactly one"):
        templates.format_template("a photo", "x")
    with pytest.raises(ConfigError, match="templates"):
        templates.templates_for("EuroSAT", "all80")
