"""Readers for the data sets of the ViT papers: VTAB-1k folders, FGVC JSON splits, image folders, video frames.

Every reader is a :class:`torch.utils.data.Dataset` of ``(image, label)`` pairs (``(frames, label)`` with
frames of shape ``(T, C, H, W)`` for video) with ``.classes`` (class names, or the class ids as strings),
``.samples`` (``(path, label)`` pairs) and ``.skipped`` (paths dropped by ``skip_bad=True``).

Formats (see ``reference/vit.md`` section 6):

* VTAB-1k, as written by NOAH's ``get_vtab1k.py``: ``<task>/{train800,val200,train800val200,test}.txt``
  with lines ``images/<split>/000000.jpg <label>``.
* FGVC, as VPT and V-PETL Bench ship it: ``<root>/{train,val,test}.json`` mapping image paths to class ids.
* An image folder with one subfolder per class.
* Video as folders of frame images, listed in a ``<folder> <label>`` file (ST-Adapter / VideoMAE lists).

A missing or unreadable image stops with a :class:`~visionpeft.errors.DataError` naming its path and
``skip_hint`` (what to do; default "pass skip_bad=True", run configs pass their own spelling);
``skip_bad=True`` checks every file up front, drops the bad ones and logs how many.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from visionpeft.errors import ConfigError, DataError
from visionpeft.files import read_text
from visionpeft.images import IMAGE_EXTENSIONS, SKIP_HINT, check_images, drop_bad, image_problem, read_image

# -- VTAB-1k --

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")

# Keyed by the canonical task names; counts from VPT's tune_vtab.py DATA2CLS and NOAH's lib/datasets.py.
VTAB_NUM_CLASSES: dict[str, int] = {
    "caltech101": 102,
    "cifar100": 100,
    "dtd": 47,
    "flowers102": 102,
    "pets": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}

VTAB_GROUPS: dict[str, tuple[str, ...]] = {
    "natural": ("caltech101", "cifar100", "dtd", "flowers102", "pets", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
                   "smallnorb_ele"),
}

# The folder each task gets from NOAH's get_vtab1k.py (also used by V-PETL Bench and PETL-ViT).
VTAB_FOLDERS: dict[str, str] = {name: name for name in VTAB_NUM_CLASSES}
VTAB_FOLDERS.update(cifar100="cifar", flowers102="oxford_flowers102", pets="oxford_iiit_pet")

# Other spellings seen in the training scripts of VPT, NOAH, V-PETL Bench and in TFDS names.
_VTAB_ALIASES: dict[str, str] = {
    "cifar": "cifar100", "cifar_100": "cifar100",
    "oxford_flowers102": "flowers102", "oxford_flowers": "flowers102", "flowers": "flowers102",
    "oxford_iiit_pet": "pets", "oxford_pet": "pets", "oxford_pets": "pets", "pet": "pets",
    "camelyon": "patch_camelyon", "pcam": "patch_camelyon",
    "retinopathy": "diabetic_retinopathy", "diabetic_retinopathy_detection": "diabetic_retinopathy",
    "resisc": "resisc45", "svhn_cropped": "svhn", "caltech": "caltech101",
    "clevr_count_all": "clevr_count", "clevr_closest_object_distance": "clevr_dist",
    "kitti_distance": "kitti", "kitti_closest_vehicle_distance": "kitti",
    "dsprites_xpos": "dsprites_loc", "dsprites_x_position": "dsprites_loc", "dsprites_orientation": "dsprites_ori",
    "smallnorb_azimuth": "smallnorb_azi", "smallnorb_elevation": "smallnorb_ele",
}


def _normalise_name(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def canonical_vtab_task(name: str) -> str:
    """The canonical name of a VTAB-1k task (a key of :data:`VTAB_NUM_CLASSES`) from any known spelling.

    Accepts the canonical names, NOAH's folder names (``cifar``, ``oxford_iiit_pet``, ...), the
    training scripts' keys (``cifar100``, ``oxford_pet``, ...) and a ``vtab-`` prefix, case-insensitively.
    """
    key = _normalise_name(name)
    key = key.removeprefix("vtab_").removeprefix("vtab/")
    if key in VTAB_NUM_CLASSES:
        return key
    if key in _VTAB_ALIASES:
        return _VTAB_ALIASES[key]
    raise DataError(f"unknown VTAB-1k task {name!r}; known tasks: {sorted(VTAB_NUM_CLASSES)}")


def vtab_task_dir(vtab_root: str | os.PathLike, task: str) -> Path:
    """The folder of ``task`` under the VTAB-1k root, whichever naming convention the folders follow.

    ``vtab_task_dir(root, "cifar100")`` finds ``root/cifar`` (NOAH's folder) as well as ``root/cifar100``.
    """
    root = Path(vtab_root)
    canonical = canonical_vtab_task(task)
    names = [task, VTAB_FOLDERS[canonical], canonical]
    names += [alias for alias, target in _VTAB_ALIASES.items() if target == canonical]
    tried: list[str] = []
    for name in names:
        if name in tried:
            continue
        tried.append(name)
        if (root / name).is_dir():
            return root / name
    present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    where = f"folders present: {present}" if root.is_dir() else "that folder does not exist"
    raise DataError(f"no folder for VTAB-1k task {task!r} under {root}; tried {tried}; {where}")


# -- FGVC --

# Keyed by VPT's dataset names; counts from reference/vit.md section 6.2.
FGVC_NUM_CLASSES: dict[str, int] = {
    "CUB": 200, "nabirds": 555, "OxfordFlowers": 102, "StanfordDogs": 120, "StanfordCars": 196,
}
# Where the images lie relative to the root holding the JSON files ("" = the root itself).
FGVC_IMAGE_DIRS: dict[str, str] = {
    "CUB": "images", "nabirds": "images", "StanfordDogs": "Images", "OxfordFlowers": "", "StanfordCars": "",
}
_FGVC_ALIASES: dict[str, str] = {
    "cub": "CUB", "cub_200_2011": "CUB", "cub200": "CUB",
    "nabirds": "nabirds",
    "oxfordflowers": "OxfordFlowers", "oxfordflower": "OxfordFlowers", "flowers": "OxfordFlowers",
    "stanforddogs": "StanfordDogs", "dogs": "StanfordDogs",
    "stanfordcars": "StanfordCars", "cars": "StanfordCars",
}
_FGVC_SPLIT = re.compile(r"(train|val|test|train_\d+(\.\d+)?)")


def canonical_fgvc_dataset(name: str) -> str:
    """VPT's name of an FGVC data set (a key of :data:`FGVC_NUM_CLASSES`) from VPT's or V-PETL's spelling.

    Case-insensitive; ``CUB_200_2011`` → ``CUB``, ``OxfordFlower`` → ``OxfordFlowers``.
    """
    key = _normalise_name(name)
    if key in _FGVC_ALIASES:
        return _FGVC_ALIASES[key]
    if key.replace("_", "") in _FGVC_ALIASES:
        return _FGVC_ALIASES[key.replace("_", "")]
    raise DataError(
        f"unknown FGVC data set {name!r}; choose one of {sorted(FGVC_NUM_CLASSES)} (V-PETL's CUB_200_2011 and "
        "OxfordFlower are accepted too), or leave dataset unset to read images relative to the root"
    )


# -- files, labels and images --


def parse_label(value: str | int, source: str | os.PathLike, line: int | str) -> int:
    """``value`` as a class index; anything but a non-negative integer raises naming ``source`` and ``line``."""
    label = None
    if isinstance(value, int) and not isinstance(value, bool):
        label = value
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            label = int(value)
    if label is None or label < 0:
        raise DataError(f"{source}:{line}: label {value!r} is not a non-negative integer class index")
    return label


def read_list_file(path: str | os.PathLike, num_classes: int | None = None,
                   classes_source: str = "the training split") -> list[tuple[str, int]]:
    """The ``(path, label)`` entries of a ``path label`` list file; blank lines are ignored.

    The label is the last field, so paths containing spaces are read whole. With ``num_classes`` (the
    training split's, for an evaluation split) a label ``>= num_classes`` raises naming the line and
    ``classes_source``: the head has no output for it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"list file {path} does not exist")
    entries = []
    for lineno, raw in enumerate(read_text(path).splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2:
            raise DataError(f"{path}:{lineno}: expected '<path> <label>', got {raw!r}")
        label = parse_label(fields[1], path, lineno)
        if num_classes is not None and label >= num_classes:
            raise DataError(f"{path}:{lineno}: label {label} is not a class of {classes_source}, which has "
                            f"{num_classes} classes (labels 0..{num_classes - 1}); a class the model never trains "
                            "on cannot be evaluated")
        entries.append((fields[0], label))
    return entries


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float tensor ``(C, H, W)`` in [0, 1], for readers given no transform."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


class _ImageList(Dataset):
    """Shared body of the image readers: a list of ``(path, label)`` read as RGB images."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str],
                 transform: Callable[[Image.Image], Any] | None, skip_bad: bool, source: Any,
                 skip_hint: str = SKIP_HINT) -> None:
        self.classes = classes
        self.transform = transform
        self.skip_hint = skip_hint
        self.samples, self.skipped = check_images(samples, lambda sample: sample[0], skip_bad=skip_bad, source=source,
                                                  hint=skip_hint)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = read_image(path, hint=self.skip_hint)
        return (self.transform(image) if self.transform is not None else _to_tensor(image)), label


class VTAB1k(_ImageList):
    """One split of one VTAB-1k task folder (``train800``, ``val200``, ``train800val200`` or ``test``).

    ``.classes`` are the class ids as strings. When the folder's name is a known task (any alias), there
    are as many as the task has, even if the split shows fewer (sun397's 800 training images miss
    classes); otherwise one more than the largest label in any of the folder's split files.
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None,
                 skip_bad: bool = False, skip_hint: str = SKIP_HINT) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"VTAB-1k task folder {root} does not exist")
        split = split.removesuffix(".txt")
        available = [name for name in VTAB_SPLITS if (root / f"{name}.txt").is_file()]
        if split not in available:
            raise DataError(
                f"VTAB-1k split {split!r} not found in {root}; available split files: "
                f"{[name + '.txt' for name in available]} (expected {list(VTAB_SPLITS)})"
            )
        entries = {name: read_list_file(root / f"{name}.txt") for name in available}
        num_classes = 1 + max((label for rows in entries.values() for _, label in rows), default=-1)
        try:
            task = canonical_vtab_task(root.name)
        except DataError:
            task = None
        if task is not None:
            known = VTAB_NUM_CLASSES[task]
            for name, rows in entries.items():
                for path, label in rows:
                    if label >= known:
                        raise DataError(f"{root / (name + '.txt')}: {path} has label {label}, out of range for "
                                        f"{task} ({known} classes); is this folder really {task}?")
            num_classes = known
        self.task = task
        samples = [(str(root / path), label) for path, label in entries[split]]
        super().__init__(samples, [str(i) for i in range(num_classes)], transform, skip_bad, root / f"{split}.txt",
                         skip_hint)


class FGVC(_ImageList):
    """One split of an FGVC data set in VPT's JSON format: ``<root>/<split>.json`` = ``{image_path: class_id}``.

    Class ids are remapped to ``0..K-1`` by sorting the unique ids of every split file present
    (``train``, ``val``, ``test`` and the one asked for), so the splits agree; with ``own_classes``
    only the split's own file counts (a training split: a class only the test file has must not
    widen the head). ``.classes`` holds the original ids as strings. ``classes`` (the training
    split's ``.classes``, for an evaluation split) fixes the map instead: an id outside it (a class
    training never sees) raises naming the file and entry. ``dataset`` picks the
    image root (``images/`` for CUB and NABirds, ``Images/`` for Stanford Dogs, the root itself for
    Flowers and Cars, and for ``None``).
    """

    def __init__(self, root: str | os.PathLike, split: str, dataset: str | None = None,
                 transform: Callable | None = None, skip_bad: bool = False, skip_hint: str = SKIP_HINT,
                 classes: Sequence[str] | None = None, own_classes: bool = False) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"FGVC folder {root} does not exist")
        split = split.removesuffix(".json")
        available = sorted(p.stem for p in root.glob("*.json") if _FGVC_SPLIT.fullmatch(p.stem))
        if split not in available:
            raise DataError(
                f"FGVC split {split!r} not found in {root}; available split files: "
                f"{[name + '.json' for name in available]}"
            )
        self.dataset = canonical_fgvc_dataset(dataset) if dataset is not None else None
        image_root = root / FGVC_IMAGE_DIRS[self.dataset] if self.dataset is not None else root
        if not image_root.is_dir():
            raise DataError(f"image folder {image_root} of {self.dataset} does not exist")
        names = {split} if own_classes else {"train", "val", "test", split}
        files = {name: self._read_json(root / f"{name}.json") for name in names if name in available}
        if classes is None:
            class_ids = [str(c) for c in sorted({label for entries in files.values() for _, label in entries})]
        else:
            class_ids = list(classes)
        index = {class_id: i for i, class_id in enumerate(class_ids)}
        for path, label in files[split]:
            if str(label) not in index:
                raise DataError(f"{root / (split + '.json')}:entry {path!r}: class id {label} is not a class of the "
                                f"training split ({len(class_ids)} classes); a class the model never trains on "
                                "cannot be evaluated")
        samples = [(str(image_root / path), index[str(label)]) for path, label in files[split]]
        super().__init__(samples, class_ids, transform, skip_bad, root / f"{split}.json", skip_hint)

    @staticmethod
    def _read_json(path: Path) -> list[tuple[str, int]]:
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected an object {{image_path: class_id}}, got {type(data).__name__}")
        # JSON carries no line numbers once parsed; the entry's key locates it instead.
        return [(key, parse_label(value, path, f"entry {key!r}")) for key, value in data.items()]


class ImageFolderDataset(_ImageList):
    """Images in ``root/<class>/...`` (searched recursively), classes in sorted folder order.

    Files with the extensions in :data:`IMAGE_EXTENSIONS` (any case) are read; hidden files are not.
    An evaluation split passes the training split's ``classes`` (and, for the message, the folder they
    come from, ``classes_source``): labels are then those of the training split, a class folder it
    lacks is refused (the head has no output for it) and a missing one is fine.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, skip_bad: bool = False,
                 skip_hint: str = SKIP_HINT, classes: Sequence[str] | None = None,
                 classes_source: str | os.PathLike = "the training split") -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist")
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not present:
            raise DataError(f"image folder {root} has no class subfolders; expected root/<class>/<image>")
        if classes is None:
            classes = present
        else:
            classes = list(classes)
            unknown = [name for name in present if name not in classes]
            if unknown:
                raise DataError(
                    f"class folder(s) {unknown[:10]} of {root} are not classes of the training split "
                    f"{classes_source} ({len(classes)} classes); the model cannot learn a class it never sees: "
                    "add it to the training split or remove it here"
                )
        samples = []
        for label, name in enumerate(classes):
            if not (root / name).is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
                dirnames.sort()
                for filename in sorted(filenames):
                    if not filename.startswith(".") and filename.lower().endswith(IMAGE_EXTENSIONS):
                        samples.append((os.path.join(dirpath, filename), label))
        if not samples:
            raise DataError(f"image folder {root} has no images with extensions {list(IMAGE_EXTENSIONS)}")
        super().__init__(samples, classes, transform, skip_bad, root, skip_hint)


# -- video --

SAMPLINGS = ("uniform", "stride")


def sample_frame_indices(num_total: int, num_frames: int, sampling: str = "uniform", stride: int = 4,
                         train: bool = False, generator: torch.Generator | None = None) -> list[int]:
    """Which ``num_frames`` of a clip's ``num_total`` frames to read.

    * ``uniform`` (TSN-style): the clip is cut into ``num_frames`` equal segments; the centre of each at
      test time, a random point of each in training.
    * ``stride``: ``num_frames`` frames ``stride`` apart, from a start that is random in training and
      centres the window at test time. Past the clip's end the last frame is repeated.

    Short clips repeat frames rather than fail. ``generator`` drives the random choices.
    """
    if num_total < 1:
        raise DataError("cannot sample frames from a clip with no frames")
    if num_frames < 1:
        raise ConfigError(f"num_frames: {num_frames} must be >= 1")
    if sampling not in SAMPLINGS:
        raise ConfigError(f"sampling: {sampling!r} is not supported; choose one of {list(SAMPLINGS)}")
    if sampling == "uniform":
        segment = num_total / num_frames
        offsets = torch.rand(num_frames, generator=generator).tolist() if train else [0.5] * num_frames
        return [min(int(segment * (i + offsets[i])), num_total - 1) for i in range(num_frames)]
    if stride < 1:
        raise ConfigError(f"stride: {stride} must be >= 1")
    slack = num_total - ((num_frames - 1) * stride + 1)
    if slack <= 0:
        start = 0
    elif train:
        start = int(torch.randint(slack + 1, (1,), generator=generator))
    else:
        start = slack // 2
    return [min(start + i * stride, num_total - 1) for i in range(num_frames)]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's, Python's and NumPy's global RNGs seeded, then restore them."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class VideoFrames(Dataset):
    """Clips stored as folders of frame images, listed in ``list_file`` as ``<folder> <label>`` lines.

    ``<folder>`` is relative to ``root`` and its images are taken in file-name order. Each item is
    ``(frames, label)`` with ``frames`` of shape ``(num_frames, C, H, W)``, chosen by
    :func:`sample_frame_indices`.

    Randomness is reproducible: item ``i`` draws from a generator seeded with ``(seed, epoch, i)``, so the
    frames picked in training differ from epoch to epoch (call :meth:`set_epoch` at the start of each)
    and do not depend on the data-loader workers. The transform is applied frame by frame with the
    global RNGs (torch, Python, NumPy) re-seeded to one per-clip value before each frame, so a random crop
    or flip is the same for every frame of a clip, as temporal models need.

    ``.classes`` are one more than the largest label, or ``num_classes`` (the training split's, for an
    evaluation split), beyond which a label raises naming its line (:func:`read_list_file`).
    """

    def __init__(self, root: str | os.PathLike, list_file: str | os.PathLike, num_frames: int = 8,
                 sampling: str = "uniform", stride: int = 4, transform: Callable | None = None,
                 train: bool = False, seed: int = 0, skip_bad: bool = False, skip_hint: str = SKIP_HINT,
                 num_classes: int | None = None, classes_source: str = "the training split") -> None:
        if num_frames < 1:
            raise ConfigError(f"num_frames: {num_frames} must be >= 1")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"sampling: {sampling!r} is not supported; choose one of {list(SAMPLINGS)}")
        if stride < 1:
            raise ConfigError(f"stride: {stride} must be >= 1")
        if seed < 0:
            raise ConfigError(f"seed: {seed} must be >= 0")
        self.root = Path(root)
        list_path = Path(list_file)
        if not list_path.is_file() and not list_path.is_absolute():
            list_path = self.root / list_path
        entries = read_list_file(list_path, num_classes, classes_source)
        if num_classes is None:
            num_classes = 1 + max((label for _, label in entries), default=-1)
        self.classes = [str(i) for i in range(num_classes)]
        self.num_frames, self.sampling, self.stride = num_frames, sampling, stride
        self.transform, self.train, self.seed, self.epoch = transform, train, seed, 0
        self.skip_hint = skip_hint
        samples = [(str(self.root / path), label) for path, label in entries]
        if skip_bad:
            samples, self.skipped = drop_bad(samples, lambda sample: sample[0],
                                             lambda sample: self._check_clip(sample[0]), source=list_path,
                                             what="unreadable clip(s)")
        else:
            self.skipped = []
            missing = [folder for folder, _ in samples if not os.path.isdir(folder)]
            if missing:
                more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
                raise DataError(f"frame folder {missing[0]} listed in {list_path} does not exist{more}; fix the "
                                f"list or {skip_hint}")
        self.samples = samples

    def _frames(self, folder: str) -> list[str]:
        if not os.path.isdir(folder):
            raise DataError(f"frame folder {folder} does not exist; fix the list or {self.skip_hint}")
        names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise DataError(f"frame folder {folder} holds no images; fix the list or {self.skip_hint}")
        return [os.path.join(folder, n) for n in names]

    def _check_clip(self, folder: str) -> str | None:
        try:
            frames = self._frames(folder)
        except DataError as exc:
            return str(exc)
        for frame in frames:
            reason = image_problem(frame)
            if reason is not None:
                return f"frame {frame}: {reason}"
        return None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random frame offsets and augmentations the next items use."""
        self.epoch = int(epoch)

    def _generator(self, index: int) -> torch.Generator:
        # SeedSequence mixes the three numbers so that (epoch, index) pairs never share a stream.
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        folder, label = self.samples[index]
        frames = self._frames(folder)
        generator = self._generator(index)
        chosen = sample_frame_indices(len(frames), self.num_frames, self.sampling, self.stride, self.train, generator)
        clip_seed = int(torch.randint(2**62, (1,), generator=generator))
        tensors = []
        for i in chosen:
            image = read_image(frames[i], hint=self.skip_hint)
            if self.transform is None:
                tensors.append(_to_tensor(image))
                continue
            with _seeded(clip_seed):
                tensors.append(self.transform(image))
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise DataError(f"frames of {folder} have different sizes {sorted(shapes)}; give a transform that "
                            "resizes them")
        return torch.stack(tensors), label
