"""Readers for the data sets of the CLIP prompt-learning papers (CoOp, CoCoOp, MaPLe) and for image folders.

Every reader returns :class:`Datum` items (image path, label, class name) gathered in a :class:`Splits`,
whose ``classnames`` are indexed by label and taken from the training split, as Dassl's ``get_lab2cname``
does. :class:`ImageDataset` turns a list of items into ``(image, label)`` pairs for a data loader.

Formats (see ``reference/vla.md`` section 1.5 and CoOp's ``DATASETS.md``):

* CoOp's fixed splits, ``split_zhou_<Dataset>.json`` = ``{"train": [[relpath, label, classname], ...],
  "val": [...], "test": [...]}``, with paths relative to the data set's image folder
  (:func:`read_split_zhou`); nine of the eleven data sets of the protocol ship one.
* ImageNet: ``imagenet/images/{train,val}/<wnid>/`` with ``imagenet/classnames.txt`` (``n01440764 tench``);
  the ILSVRC val set is both the validation and the test split, as in CoOp.
* FGVCAircraft: the data set's own ``images_variant_{train,val,test}.txt`` and ``variants.txt``.
* An image folder, ``root/<class>/<image>`` (:func:`read_imagefolder`), and ``root/{train,val,test}/``
  of those (:func:`imagefolder_splits`).

:func:`load_dataset` reads one of the eleven data sets by its CoOp name from the folder that holds them
all (CoOp's ``$DATA``). A missing folder, split file or image stops with a
:class:`~visionpeft.errors.DataError` saying where the file belongs.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from visionpeft.errors import ConfigError, DataError
from visionpeft.files import read_text
from visionpeft.images import IMAGE_EXTENSIONS, SKIP_HINT, check_images, read_image

logger = logging.getLogger("visionpeft")

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
#: what to do about a missing image, for the readers that check the files of a split
CHECK_FILES_HINT = "pass check_files=False and skip_bad=True"


@dataclass(frozen=True)
class Datum:
    """One labelled image: its path, its class index and its class name (as the split file spells it)."""

    impath: str
    label: int
    classname: str


@dataclass
class Splits:
    """The train, val and test items of a data set, with ``classnames[label]`` from the training split.

    ``val_is_test`` marks data sets without a validation split (ImageNet), whose ``val`` is the test set:
    the few-shot sampler then leaves it whole, as CoOp does.
    """

    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    classnames: list[str]
    val_is_test: bool = False

    @property
    def num_classes(self) -> int:
        """The number of classes (labels ``0 .. num_classes - 1``)."""
        return len(self.classnames)


@dataclass(frozen=True)
class DatasetInfo:
    """Where CoOp expects one data set under ``$DATA``, and how it is read.

    ``reader`` is ``split_zhou`` (a CoOp split file), ``imagenet`` or ``fgvc_aircraft``; ``image_dir`` is
    relative to ``folder`` (``""``: the folder itself); ``template`` is the key of the data set's
    zero-shot template in :data:`visionpeft.vla.templates.CUSTOM_TEMPLATES`.
    """

    name: str
    folder: str
    image_dir: str
    split_file: str | None
    template: str
    num_classes: int
    reader: str = "split_zhou"
    layout: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


def _zhou(name: str, folder: str, image_dir: str, num_classes: int, extra: str = "",
          aliases: tuple[str, ...] = ()) -> DatasetInfo:
    split = f"split_zhou_{name}.json"
    shown = image_dir or "the images' folders"
    layout = f"{folder}/ holding {shown}{'/' if image_dir else ''}{extra} and {split}"
    return DatasetInfo(name, folder, image_dir, split, name, num_classes, "split_zhou", layout, aliases)


# Folder names, image folders and split files from CoOp's datasets/*.py and DATASETS.md.
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("ImageNet", "imagenet", "images", None, "ImageNet", 1000, "imagenet",
                    "imagenet/ holding images/train/<wnid>/, images/val/<wnid>/ and classnames.txt "
                    "(lines like 'n01440764 tench')", ("imagenet1k", "ilsvrc2012", "in1k")),
        _zhou("Caltech101", "caltech-101", "101_ObjectCategories", 100, aliases=("caltech",)),
        _zhou("OxfordPets", "oxford_pets", "images", 37, ", annotations/", ("pets", "oxford_iiit_pet")),
        _zhou("StanfordCars", "stanford_cars", "", 196, " (cars_train/, cars_test/, devkit/)", ("cars",)),
        _zhou("OxfordFlowers", "oxford_flowers", "jpg", 102, ", cat_to_name.json",
              ("flowers", "flowers102", "oxford_flowers102")),
        _zhou("Food101", "food-101", "images", 101, aliases=("food",)),
        DatasetInfo("FGVCAircraft", "fgvc_aircraft", "images", None, "FGVCAircraft", 100, "fgvc_aircraft",
                    "fgvc_aircraft/ (the 'data/' folder of fgvc-aircraft-2013b, renamed) holding images/, "
                    "variants.txt and images_variant_{train,val,test}.txt", ("aircraft", "fgvc")),
        _zhou("SUN397", "sun397", "SUN397", 397, aliases=("sun",)),
        _zhou("DescribableTextures", "dtd", "images", 47, aliases=("textures",)),
        _zhou("EuroSAT", "eurosat", "2750", 10),
        _zhou("UCF101", "ucf101", "UCF-101-midframes", 101, aliases=("ucf",)),
    )
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


_NAME_INDEX: dict[str, str] = {}
for _info in DATASETS.values():
    for _spelling in (_info.name, _info.folder, *_info.aliases):
        _NAME_INDEX[_key(_spelling)] = _info.name


def closest_name(name: str, choices: Iterable[str]) -> str | None:
    """The entry of ``choices`` closest in spelling to ``name`` (case and separators ignored), if any is close."""
    choices = list(choices)
    keyed = {_key(c): c for c in choices}
    match = difflib.get_close_matches(_key(name), list(keyed), n=1, cutoff=0.5)
    return keyed[match[0]] if match else None


def canonical_dataset(name: str) -> str:
    """CoOp's name of a data set (a key of :data:`DATASETS`) from that name, its folder or a common alias.

    Case, spaces, ``-`` and ``_`` are ignored: ``caltech-101``, ``dtd`` and ``Flowers102`` are accepted.
    An unknown name raises :class:`DataError` listing the known names and the closest one.
    """
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"data set name {name!r} is not a non-empty string; choose one of {list(DATASETS)}")
    found = _NAME_INDEX.get(_key(name))
    if found is not None:
        return found
    hint = closest_name(name, list(DATASETS) + [info.folder for info in DATASETS.values()])
    suggestion = f"; did you mean {_NAME_INDEX[_key(hint)]!r}?" if hint else "."
    raise DataError(f"unknown data set {name!r}{suggestion} Known data sets: {list(DATASETS)}; for other data use "
                    "the imagefolder format (root/{train,val,test}/<class>/<image>)")


# -- class names --

# CoOp's datasets/caltech101.py: two folders dropped, four renamed.
CALTECH101_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH101_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
# CoOp's datasets/eurosat.py NEW_CNAMES.
EUROSAT_CLASSNAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


def prompt_classname(name: str) -> str:
    """A class name as it enters a prompt: ``_`` becomes a space (``apple_pie`` → ``apple pie``), as in CoOp."""
    return name.replace("_", " ")


#: why two class names are refused as one, for the messages
SAME_TO_CLIP = "one class name to CLIP (its tokenizer reads '_' as a space and ignores case)"


def classname_key(name: str) -> str:
    """A class name as CLIP's tokenizer reads it in a prompt: ``_`` as a space, runs of white space as one, lower
    case (open_clip's default cleaning). Two names with one key give identical prompts, so identical logits."""
    return " ".join(prompt_classname(name).split()).lower()


def duplicate_classnames(names: Sequence[str]) -> list[list[int]]:
    """The groups (two or more indices, in order) of ``names`` that share a :func:`classname_key`.

    CLIP cannot tell such classes apart: their text features are equal and argmax always picks the first.
    """
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(classname_key(name), []).append(index)
    return [group for group in groups.values() if len(group) > 1]


def duplicates_problem(names: Sequence[str], show: Callable[[int], str], fix: str, where: str = "") -> str | None:
    """Why ``names`` cannot all be classified (its first group of :func:`duplicate_classnames`), or ``None``.

    ``show(i)`` describes class ``i`` where it comes from (a label and an image, a line of a file),
    ``where`` follows the classes shown, ``fix`` is what to do: the one wording of the data readers'
    and the prompt learners' errors.
    """
    groups = duplicate_classnames(names)
    if not groups:
        return None
    more = f" ({len(groups) - 1} more such group(s))" if len(groups) > 1 else ""
    shown = " and ".join(show(i) for i in groups[0])
    return (f"{shown}{where} are {SAME_TO_CLIP}{more}: their prompts are identical, so the classifier always picks "
            f"the first; {fix}")


def pets_classname(image_name: str) -> str:
    """Oxford Pets' breed from an image name: all before the last ``_``, lower-cased (``Abyssinian_100.jpg``)."""
    stem = os.path.splitext(os.path.basename(image_name))[0]
    return "_".join(stem.split("_")[:-1]).lower()


def cars_classname(meta_name: str) -> str:
    """A Stanford Cars name from ``cars_meta.mat`` with its year moved to the front (``2012 Tesla Model S Sedan``)."""
    words = meta_name.split(" ")
    return " ".join([words[-1], *words[:-1]])


def sun397_classname(category: str) -> str:
    """A SUN397 name from its category path: the letter dropped, the rest reversed (``a/apartment_building/outdoor``
    → ``outdoor apartment_building``), so that words like indoor/outdoor come first, as CoOp writes them."""
    return " ".join(category.strip("/").split("/")[1:][::-1])


def ucf101_classname(action: str) -> str:
    """A UCF101 name from its CamelCase action: words joined by ``_`` (``ApplyEyeMakeup`` → ``Apply_Eye_Makeup``)."""
    return "_".join(re.findall(r"[A-Z][^A-Z]*", action))


def folder_classname(dataset: str | None, folder: str) -> str | None:
    """The class name CoOp gives the image folder ``folder`` of ``dataset``, or ``None`` if CoOp drops it.

    Caltech101 drops ``BACKGROUND_Google`` and ``Faces_easy`` and singularises four names; EuroSAT's folders
    get descriptive names; UCF101's CamelCase folders are split into words. Other data sets (and
    ``dataset=None``) keep the folder name.
    """
    name = canonical_dataset(dataset) if dataset is not None else None
    if name == "Caltech101":
        return None if folder in CALTECH101_IGNORED else CALTECH101_RENAMES.get(folder, folder)
    if name == "EuroSAT":
        return EUROSAT_CLASSNAMES.get(folder, folder)
    if name == "UCF101" and "_" not in folder:
        return ucf101_classname(folder) or folder
    return folder


# -- splits --


def classnames_of(items: Sequence[Datum], split: str = "train") -> list[str]:
    """``classnames[label]`` from ``items``, as Dassl's ``get_lab2cname`` (the sorted labels' names).

    Unlike Dassl, which keeps one name at random when a label has two and a shorter list when a label is
    missing, both raise :class:`DataError`: the prompts would be built for the wrong classes.
    """
    if not items:
        raise DataError(f"the {split} split is empty: no classes to learn; check the split file or folder")
    names: dict[int, str] = {}
    examples: dict[int, str] = {}
    for item in items:
        known = names.setdefault(item.label, item.classname)
        examples.setdefault(item.label, item.impath)
        if known != item.classname:
            raise DataError(f"label {item.label} is named both {known!r} and {item.classname!r} in the {split} "
                            f"split (e.g. {item.impath}); each label needs one class name")
    labels = sorted(names)
    missing = sorted(set(range(labels[-1] + 1)) - set(labels))
    if labels[0] < 0 or missing:
        detail = f"negative label {labels[0]}" if labels[0] < 0 else f"labels {missing[:10]} have no image"
        raise DataError(f"the {split} split's labels are not 0..{labels[-1]}: {detail}; every class needs "
                        "training images, with labels counted from 0")
    classnames = [names[label] for label in labels]
    problem = duplicates_problem(classnames, lambda i: f"label {i} {classnames[i]!r} (e.g. {examples[i]})",
                                 "give each class a distinct name", where=f" of the {split} split")
    if problem:
        raise DataError(problem)
    return classnames


def make_splits(train: list[Datum], val: list[Datum], test: list[Datum], val_is_test: bool = False) -> Splits:
    """A :class:`Splits` with the class names of ``train``, after checking that val and test agree with it.

    A val or test label outside the training classes, or named differently, raises :class:`DataError`.
    """
    classnames = classnames_of(train, "train")
    for split, items in (("val", val), ("test", test)):
        for item in items:
            if not 0 <= item.label < len(classnames):
                raise DataError(f"{item.impath} in the {split} split has label {item.label}, but the training split "
                                f"has labels 0..{len(classnames) - 1} only")
            if item.classname != classnames[item.label]:
                raise DataError(f"{item.impath} in the {split} split names label {item.label} {item.classname!r}, "
                                f"but the training split calls it {classnames[item.label]!r}")
    return Splits(list(train), list(val), list(test), classnames, val_is_test)


def _check_files(splits: Splits, source: Any, hint: str) -> None:
    # A stat per file is cheap and turns a crash hours into training into an error at start.
    for split in ("train", "val", "test"):
        missing = [item.impath for item in getattr(splits, split) if not os.path.isfile(item.impath)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"image {missing[0]} of the {split} split in {source} does not exist{more}; check that "
                            f"the images are unpacked where the split expects them, or {hint} to drop missing images")


def read_split_zhou(json_path: str | os.PathLike, image_dir: str | os.PathLike, check_files: bool = True,
                    skip_hint: str = CHECK_FILES_HINT) -> Splits:
    """The splits of a CoOp ``split_zhou_*.json`` file, with each relative path joined to ``image_dir``.

    Labels are converted with ``int`` as CoOp's ``read_split`` does; items keep the file's order (the
    few-shot sampler depends on it). ``check_files`` checks that every image exists; a missing one
    raises, its message ending with ``skip_hint``.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataError(f"split file {json_path} does not exist; CoOp's split files are linked from {COOP_DATASETS_MD}")
    try:
        content = json.loads(read_text(json_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"split file {json_path} is not valid JSON ({exc}); download it again") from exc
    if not isinstance(content, dict) or any(k not in content for k in ("train", "val", "test")):
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DataError(f"split file {json_path} must be an object with 'train', 'val' and 'test' lists; got {keys}")
    parts: dict[str, list[Datum]] = {}
    for split in ("train", "val", "test"):
        entries = content[split]
        if not isinstance(entries, list):
            raise DataError(f"{json_path}: '{split}' must be a list of [path, label, classname]")
        items = []
        for index, entry in enumerate(entries):
            if (not isinstance(entry, (list, tuple)) or len(entry) != 3 or not isinstance(entry[0], str)
                    or not isinstance(entry[2], str)):
                raise DataError(f"{json_path}: {split}[{index}] = {entry!r} is not [path, label, classname]")
            try:
                label = int(entry[1])
            except (TypeError, ValueError):
                raise DataError(f"{json_path}: {split}[{index}] has label {entry[1]!r}, not an integer") from None
            items.append(Datum(os.path.join(str(image_dir), entry[0]), label, entry[2]))
        parts[split] = items
    try:
        splits = make_splits(parts["train"], parts["val"], parts["test"])
    except DataError as exc:
        raise DataError(f"{json_path}: {exc}") from None
    if check_files:
        _check_files(splits, json_path, skip_hint)
    return splits


def _image_files(folder: Path, recursive: bool) -> list[str]:
    """The image files of ``folder`` in sorted order, hidden files skipped."""
    if not recursive:
        return [str(folder / n) for n in sorted(os.listdir(folder))
                if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS) and (folder / n).is_file()]
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, n) for n in sorted(filenames)
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_imagefolder(root: str | os.PathLike, dataset: str | None = None,
                     classes: Sequence[str] | None = None,
                     classes_source: str | os.PathLike = "the training split") -> tuple[list[Datum], list[str]]:
    """The images of ``root/<class>/<image>`` (subfolders searched too) and the class names by label.

    Classes are the sorted class folders, or ``classes`` (folder names) when given, so that the val and test
    folders of a split share the training labels; a folder outside ``classes`` raises naming it and
    ``classes_source`` (where they come from). ``dataset`` applies CoOp's class-name rules of that data
    set to the folder names (:func:`folder_classname`).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    present = _class_folders(root)
    if classes is None:
        folders = [f for f in present if folder_classname(dataset, f) is not None]
        if not folders:
            raise DataError(f"image folder {root} has no class subfolders; expected root/<class>/<image>")
    else:
        folders = list(classes)
        unknown = sorted(set(present) - set(folders) - {f for f in present if folder_classname(dataset, f) is None})
        if unknown:
            raise DataError(f"class folders {unknown[:10]} of {root} are not among the training classes (the class "
                            f"folders of {classes_source}); every split must use the training split's class folders")
    names = [folder_classname(dataset, f) or f for f in folders]
    items = []
    for label, (folder, name) in enumerate(zip(folders, names, strict=True)):
        found = _image_files(root / folder, recursive=True) if (root / folder).is_dir() else []
        if not found and classes is None:
            # A class without images would silently vanish from the label set (and shift the prompts).
            raise DataError(f"class folder {root / folder} has no images with extensions {list(IMAGE_EXTENSIONS)}; "
                            "add images or remove the folder")
        items += [Datum(path, label, name) for path in found]
    if not items:
        raise DataError(f"image folder {root} has no images with extensions {list(IMAGE_EXTENSIONS)}")
    return items, names


def imagefolder_splits(root: str | os.PathLike, train: str = "train", val: str | None = "val", test: str = "test",
                       dataset: str | None = None, evaluate: str | None = "test") -> Splits:
    """The splits of ``root/{train,val,test}/<class>/<image>``, labelled by the training split's class folders.

    Only the folders a run uses must exist: the training folder and the one of the split it evaluates on,
    ``evaluate`` (``"test"``, ``"val"``, or ``None`` for none); a missing one raises naming it. The others
    are read when present. Without a val folder (or with ``val=None``) the test split doubles as validation,
    as ImageNet in CoOp; without a test folder the test split is empty.
    """
    if evaluate not in ("test", "val", None):
        raise ConfigError(f"evaluate: {evaluate!r}; choose 'test', 'val' or None")
    root = Path(root)
    layout = f"{root}/{{train,val,test}}/<class>/<image>"
    if not (root / train).is_dir():
        present = _class_folders(root) if root.is_dir() else []
        where = f"folders present: {present}" if root.is_dir() else "that folder does not exist"
        raise DataError(f"no training folder {root / train}; expected {layout} ({where})")
    train_items, _ = read_imagefolder(root / train, dataset)
    folders = [f for f in _class_folders(root / train) if folder_classname(dataset, f) is not None]

    def read(split: str, name: str | None) -> list[Datum] | None:
        if name is None or not (root / name).is_dir():
            if split == evaluate:
                raise DataError(f"no {split} folder {root / (name or split)}, the split the run evaluates on; "
                                f"expected {layout} (folders present: {_class_folders(root)})")
            return None
        return read_imagefolder(root / name, dataset, classes=folders, classes_source=root / train)[0]

    test_items = read("test", test) or []
    val_items = read("val", val)
    if val_items is None:
        return make_splits(train_items, test_items, test_items, val_is_test=True)
    return make_splits(train_items, val_items, test_items)


def read_imagenet(dataset_dir: str | os.PathLike, check_files: bool = False,
                  skip_hint: str = CHECK_FILES_HINT) -> Splits:
    """ImageNet as CoOp reads it: ``images/train`` and ``images/val`` class folders named by ``classnames.txt``.

    Labels follow the sorted training folders; the ILSVRC val set is both ``val`` and ``test``. Images are
    taken in sorted order, where CoOp takes ``os.listdir``'s (file-system dependent) order.
    """
    dataset_dir = Path(dataset_dir)
    text_file = dataset_dir / "classnames.txt"
    if not text_file.is_file():
        raise DataError(f"ImageNet class names {text_file} not found; CoOp's DATASETS.md links classnames.txt "
                        f"({COOP_DATASETS_MD}); lines are '<wnid> <class name>'")
    classnames: dict[str, str] = {}
    lines: dict[str, int] = {}
    for lineno, line in enumerate(read_text(text_file).splitlines(), start=1):
        words = line.strip().split(" ")
        if not words[0]:
            continue
        if len(words) < 2:
            raise DataError(f"{text_file}:{lineno}: expected '<wnid> <class name>', got {line!r}")
        classnames[words[0]] = " ".join(words[1:])
        lines[words[0]] = lineno
    parts: dict[str, list[Datum]] = {}
    folders: list[str] = []
    for split in ("train", "val"):
        split_dir = dataset_dir / "images" / split
        if not split_dir.is_dir():
            raise DataError(f"ImageNet folder {split_dir} not found; extract the ILSVRC {split} set there "
                            f"(one folder per class, e.g. n01440764/), see {COOP_DATASETS_MD}")
        present = _class_folders(split_dir)
        if split == "train":
            folders = present
        unnamed = [f for f in present if f not in classnames]
        if unnamed:
            raise DataError(f"class folder(s) {unnamed[:5]} of {split_dir} are not in {text_file}")
        if split == "train":
            named = [(folder, classnames[folder], lines[folder]) for folder in folders]
            problem = duplicates_problem([name for _, name, _ in named],
                                         lambda i, named=named: f"line {named[i][2]} ({named[i][0]} {named[i][1]!r})",
                                         "rename one of them in that file")
            if problem:
                raise DataError(f"{text_file}: {problem}")
        stray = sorted(set(present) - set(folders))
        if stray:
            raise DataError(f"class folder(s) {stray[:5]} of {split_dir} have no training folder")
        items = []
        for label, folder in enumerate(folders):
            found = _image_files(split_dir / folder, False) if (split_dir / folder).is_dir() else []
            if not found and split == "train":
                raise DataError(f"ImageNet class folder {split_dir / folder} has no images")
            items += [Datum(p, label, classnames[folder]) for p in found]
        parts[split] = items
    splits = make_splits(parts["train"], parts["val"], parts["val"], val_is_test=True)
    if check_files:
        _check_files(splits, dataset_dir, skip_hint)
    return splits


def read_fgvc_aircraft(dataset_dir: str | os.PathLike, check_files: bool = True,
                       skip_hint: str = CHECK_FILES_HINT) -> Splits:
    """FGVCAircraft as CoOp reads it: ``images_variant_{train,val,test}.txt`` lines ``<image id> <variant>``,
    labelled by the line of ``variants.txt`` that names the variant; images are ``images/<image id>.jpg``."""
    dataset_dir = Path(dataset_dir)
    variants_file = dataset_dir / "variants.txt"
    if not variants_file.is_file():
        raise DataError(f"FGVCAircraft list {variants_file} not found; use the 'data/' folder of "
                        "fgvc-aircraft-2013b.tar.gz renamed to fgvc_aircraft/")
    variants = [line.strip() for line in read_text(variants_file).splitlines() if line.strip()]
    label_of = {name: i for i, name in enumerate(variants)}
    parts: dict[str, list[Datum]] = {}
    for split in ("train", "val", "test"):
        list_file = dataset_dir / f"images_variant_{split}.txt"
        if not list_file.is_file():
            raise DataError(f"FGVCAircraft list {list_file} not found; it ships in fgvc-aircraft-2013b's data/ folder")
        items = []
        for lineno, line in enumerate(read_text(list_file).splitlines(), start=1):
            words = line.strip().split(" ")
            if not words[0]:
                continue
            variant = " ".join(words[1:])
            if variant not in label_of:
                raise DataError(f"{list_file}:{lineno}: variant {variant!r} is not in {variants_file}")
            items.append(Datum(str(dataset_dir / "images" / f"{words[0]}.jpg"), label_of[variant], variant))
        parts[split] = items
    splits = make_splits(parts["train"], parts["val"], parts["test"])
    if check_files:
        _check_files(splits, dataset_dir, skip_hint)
    return splits


def dataset_dir(name: str, root: str | os.PathLike) -> Path:
    """The folder of data set ``name`` under ``root`` (CoOp's ``$DATA``), or ``root`` itself if it is that folder."""
    info = DATASETS[canonical_dataset(name)]
    root = Path(root).expanduser()
    if (root / info.folder).is_dir():
        return root / info.folder
    if root.name == info.folder and root.is_dir():
        return root
    where = "that folder does not exist" if not root.is_dir() else f"folders present: {_class_folders(root)[:20]}"
    raise DataError(f"no folder {root / info.folder} for {info.name} ({where}); CoOp's DATASETS.md puts it at "
                    f"$DATA/{info.layout}; set the root to $DATA, the folder that holds {info.folder}/ "
                    f"({COOP_DATASETS_MD})")


def load_dataset(name: str, root: str | os.PathLike, check_files: bool = True,
                 skip_hint: str = CHECK_FILES_HINT) -> Splits:
    """Data set ``name`` (a CoOp name, see :data:`DATASETS`) from ``root``, CoOp's ``$DATA`` folder.

    Reads the split file (or ImageNet's and FGVCAircraft's own lists) in CoOp's folder layout and checks
    that every image exists (``check_files``; ImageNet is checked by :class:`ImageDataset` instead, its
    1.3 million files come straight from a folder listing). A class count other than the data set's
    logs a warning (a subset of the data is allowed).
    """
    info = DATASETS[canonical_dataset(name)]
    folder = dataset_dir(info.name, root)
    if info.reader == "imagenet":
        splits = read_imagenet(folder)
    elif info.reader == "fgvc_aircraft":
        splits = read_fgvc_aircraft(folder, check_files=check_files, skip_hint=skip_hint)
    else:
        split_path = folder / info.split_file
        if not split_path.is_file():
            raise DataError(f"split file {split_path} not found; CoOp's DATASETS.md puts {info.split_file} at "
                            f"$DATA/{info.folder}/{info.split_file} (download link there: {COOP_DATASETS_MD}); "
                            f"expected layout: $DATA/{info.layout}")
        image_dir = folder / info.image_dir if info.image_dir else folder
        if not image_dir.is_dir():
            raise DataError(f"image folder {image_dir} for {info.name} not found; expected layout: $DATA/{info.layout}")
        splits = read_split_zhou(split_path, image_dir, check_files=check_files, skip_hint=skip_hint)
    if splits.num_classes != info.num_classes:
        logger.warning("%s has %d classes in %s, the protocol's has %d", info.name, splits.num_classes, folder,
                       info.num_classes)
    return splits


# -- images --


class ImageDataset(Dataset):
    """``(image, label)`` pairs over a list of :class:`Datum`, the image passed through ``transform``.

    Without a transform an image is a float tensor ``(3, H, W)`` in [0, 1]. Every path is checked to exist
    up front; an image that cannot be decoded raises :class:`DataError` naming it when it is read.
    ``skip_bad=True`` instead decodes every image once up front and drops the bad ones (``.skipped``
    lists them, and a warning gives the count). ``skip_hint`` is the advice the errors give.
    """

    def __init__(self, items: Sequence[Datum], transform: Callable[[Image.Image], Any] | None = None,
                 skip_bad: bool = False, source: Any = "the data", skip_hint: str = SKIP_HINT) -> None:
        self.transform = transform
        self.skip_hint = skip_hint
        self.items, self.skipped = check_images(items, lambda item: item.impath, skip_bad=skip_bad, source=source,
                                                hint=skip_hint)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        item = self.items[index]
        image = read_image(item.impath, hint=self.skip_hint)
        if self.transform is not None:
            return self.transform(image), item.label
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(image).float().div_(255), item.label
