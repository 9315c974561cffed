"""Training data for Stable Diffusion adapters: captioned image folders and DreamBooth instance images.

Captions come, in this order, from one instance prompt for every image (DreamBooth), from a
``metadata.jsonl`` in the folder (Hugging Face imagefolder: one JSON object per line with
``file_name`` and the caption column, ``text`` by default), or from a ``.txt`` file beside each
image. For prior preservation, class images (a folder the user provides: they are not generated
here) are paired with the instance images and trained under the class prompt. For T2I-Adapter,
each image gets a condition image: the file with the same relative name in a condition folder, or
one extracted on the fly (:mod:`visionpeft.diffusion.conditions`: ``canny``, ``sketch``).

Image handling: training images of any mode are converted to RGB (as diffusers' scripts do);
condition images must have the adapter's channel count: a grayscale (``L`` / ``1``) condition is
replicated for a 3-channel adapter, while a colour condition for a 1-channel adapter or a
condition with an alpha channel is a :class:`~visionpeft.errors.DataError` naming the file (there
is no one right way to drop colour or transparency from a control image). The shorter side is
resized to ``resolution``, then a center or random crop and an optional horizontal flip apply to
the image and its condition alike: a condition of another size is first resized to its image,
and one of another aspect ratio is a ``DataError`` naming both files and sizes. diffusers'
``train_t2i_adapter_sdxl.py`` resizes and center-crops image and condition each on its own
(``Resize`` + ``CenterCrop``), which pairs the same pixels only when their aspect ratios agree;
with a random crop or a flip, or another ratio, the control would silently point at other pixels
than the image's. The randomness of an item (crop, flip, caption dropout) comes
from a generator seeded by the run's seed, the epoch and the item's index, so a resumed run sees
the same items.

An unreadable image stops with its path; ``skip_bad=True`` checks every file up front, drops the
bad ones and counts them in ``skipped``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from visionpeft.errors import DataError
from visionpeft.files import read_text
from visionpeft.images import IMAGE_EXTENSIONS, SKIP_HINT, check_images, drop_bad, image_problem, read_image

METADATA_FILE = "metadata.jsonl"


@dataclass
class ImageRecord:
    """One training image: its file, caption and (for T2I-Adapter) its condition image file."""

    path: Path
    caption: str
    condition: Path | None = None


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursively, sorted), by extension."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def open_image(path: Path, hint: str = SKIP_HINT) -> Image.Image:
    """The decoded image at ``path`` in its own mode, EXIF orientation applied; unreadable files raise DataError.

    ``hint`` ends the error's message: what to do about the file.
    """
    return read_image(path, mode=None, exif_transpose=True, hint=hint)


def condition_to_mode(image: Image.Image, channels: int, path: Path | str) -> Image.Image:
    """A condition image in the adapter's mode: ``"L"`` for 1 channel, ``"RGB"`` for 3.

    Grayscale and binary images are lossless in either; palette images become RGB. Colour for a
    1-channel adapter, an alpha channel, or another mode raises :class:`DataError` naming ``path``.
    """
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        raise DataError(
            f"condition image {path} has an alpha channel (mode {mode}); save it without transparency "
            "(e.g. flattened on black) so the control signal is unambiguous"
        )
    if channels == 1:
        if mode in ("L", "1"):
            return image.convert("L")
        raise DataError(
            f"condition image {path} is {mode} but the adapter takes 1-channel (grayscale) conditions; convert the "
            "condition images to grayscale, or train an adapter with in_channels: 3"
        )
    if channels == 3:
        if mode in ("RGB", "L", "1", "P"):
            return image.convert("RGB")
        raise DataError(f"condition image {path} has mode {mode}; give RGB or grayscale condition images")
    raise DataError(f"the adapter takes {channels}-channel conditions; condition images give 1 (L) or 3 (RGB)")


def _captions_from_metadata(root: Path, column: str) -> list[ImageRecord]:
    path = root / METADATA_FILE
    records = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err})") from err
        if not isinstance(row, dict) or "file_name" not in row:
            raise DataError(f"{path}:{lineno}: each line needs a 'file_name' (imagefolder metadata)")
        if column not in row or not isinstance(row[column], str):
            raise DataError(
                f"{path}:{lineno}: no caption column {column!r} (keys: {sorted(row)}); set data.caption_column"
            )
        records.append(ImageRecord(root / row["file_name"], row[column]))
    if not records:
        raise DataError(f"{path} lists no images")
    return records


def _captions_from_txt(root: Path) -> list[ImageRecord]:
    records = []
    for image in list_images(root):
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            raise DataError(
                f"no caption for {image}: {txt.name} is missing beside it; give every image a .txt caption, a "
                f"{METADATA_FILE} in {root}, or one data.instance_prompt for all images"
            )
        records.append(ImageRecord(image, read_text(txt).strip()))
    return records


def read_records(root: Path, *, instance_prompt: str | None = None, caption_column: str = "text") -> list[ImageRecord]:
    """The images of ``root`` with their captions (instance prompt, ``metadata.jsonl`` or ``.txt`` files)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root: the image folder {root} does not exist")
    if instance_prompt is not None:
        records = [ImageRecord(p, instance_prompt) for p in list_images(root)]
    elif (root / METADATA_FILE).is_file():
        records = _captions_from_metadata(root, caption_column)
    else:
        records = _captions_from_txt(root)
    if not records:
        raise DataError(f"data.root: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return records


def caption_source(root: Path, *, instance_prompt: str | None = None, caption_column: str = "text") -> str:
    """Where :func:`read_records` takes the captions of ``root`` from, in the run config's terms (for messages)."""
    root = Path(root)
    if instance_prompt is not None:
        return "data.instance_prompt"
    if (root / METADATA_FILE).is_file():
        return f"column {caption_column!r} of {root / METADATA_FILE}"
    return f"the .txt captions beside the images in {root}"


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """The (width, height) of an image of ``size`` whose shorter side is resized to ``resolution``."""
    w, h = size
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """``image`` with its shorter side resized to ``resolution`` and the centred square cut out: the training
    images' geometry with ``crop: center`` (diffusers' ``Resize`` + ``CenterCrop``), for sampling conditions."""
    rw, rh = resized_size(image.size, resolution)
    top, left = (rh - resolution) // 2, (rw - resolution) // 2
    image = image.resize((rw, rh), resample=Image.Resampling.BILINEAR)
    return image.crop((left, top, left + resolution, top + resolution))


def pairing_problem(image: Path, image_size: tuple[int, int], condition: Path,
                    condition_size: tuple[int, int]) -> str | None:
    """Why a condition image cannot be paired with its training image, or ``None``.

    Another scale is fine (the condition is resized to the image); another aspect ratio, beyond the
    rounding of a resize, is not: stretching it would move the control away from the pixels it
    describes.
    """
    (w, h), (cw, ch) = image_size, condition_size
    if abs(cw * h - ch * w) <= max(w, h):
        return None
    return (f"condition image {condition} is {cw}x{ch} but its image {image} is {w}x{h}, another aspect ratio; "
            "stretched, the control would point at other pixels than the image's; give a condition of the image's "
            "aspect ratio (the same pixels, at any size)")


def _path(record: ImageRecord) -> Path:
    return record.path


def _item_rng(seed: int, epoch: int, index: int, salt: int = 0) -> random.Random:
    return random.Random(((seed * 1000003 + epoch) * 1000003 + index) * 7 + salt)


class SDImageDataset(Dataset):
    """Images (and their conditions and class images) as tensors for Stable Diffusion training.

    An item is a dict: ``pixel_values`` (``(3, H, W)`` in [-1, 1]), ``prompt``, ``original_size`` and
    ``crop_top_left`` (SDXL's micro-conditioning), ``condition`` (``(C, H, W)`` in [0, 1]) when
    conditions are configured, and with class images ``class_pixel_values`` / ``class_prompt``
    (and their sizes). With cached latents (:meth:`set_latent_cache`), ``latent_dist`` (the VAE
    posterior's mean and log-variance) replaces ``pixel_values``.

    Args:
        records: the instance images (:func:`read_records`).
        resolution: the square training size in pixels.
        crop: ``"center"`` or ``"random"``.
        flip: flip horizontally with probability 0.5.
        caption_dropout: probability of training on the empty caption (unconditional), as
            classifier-free-guidance training does.
        class_records: class images for prior preservation (their caption is the class prompt).
        condition_root: folder of condition images with the instance images' relative names.
        condition_kind: a built-in extractor (``canny``, ``sketch``) instead of a folder.
        condition_channels: the adapter's input channels (1 or 3).
        image_root: the folder the records' relative names are taken from (for condition files).
        skip_bad: drop unreadable images (and missing conditions) up front, counted in ``skipped``.
        skip_hint: what the errors about a bad image advise (run configs pass "set data.skip_bad: true").
        seed: seed of the per-item randomness.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        resolution: int = 512,
        crop: str = "center",
        flip: bool = False,
        caption_dropout: float = 0.0,
        class_records: Sequence[ImageRecord] | None = None,
        condition_root: Path | None = None,
        condition_kind: str | None = None,
        condition_channels: int = 3,
        image_root: Path | None = None,
        skip_bad: bool = False,
        skip_hint: str = SKIP_HINT,
        seed: int = 0,
    ) -> None:
        if crop not in ("center", "random"):
            raise DataError(f"data.crop: {crop!r} is not 'center' or 'random'")
        self.resolution = resolution
        self.crop = crop
        self.flip = flip
        self.caption_dropout = caption_dropout
        self.condition_kind = condition_kind
        self.condition_channels = condition_channels
        self.seed = seed
        self.epoch = 0
        self.skip_hint = skip_hint
        no_condition: list[Path] = []
        if condition_root is not None:
            records = [self._with_condition(r, Path(condition_root), image_root, skip_bad) for r in records]
            records, no_condition = drop_bad(records, _path, lambda r: None if r.condition else "no condition image",
                                             source=condition_root, what="image(s) without a condition image")
        self.records, skipped = check_images(records, _path, skip_bad=skip_bad, source="the training images",
                                             hint=skip_hint, problem=self._problem)
        self.class_records, class_skipped = check_images(list(class_records or []), _path, skip_bad=skip_bad,
                                                         source="the class images", hint=skip_hint)
        self.skipped: list[Path] = no_condition + skipped + class_skipped
        if not self.records:
            raise DataError(f"no readable training images are left ({len(self.skipped)} skipped); check data.root "
                            "and the files it holds")
        if class_records is not None and not self.class_records:
            raise DataError("no readable class images are left for prior preservation; check data.class_root, "
                            "or remove data.class_root and data.class_prompt to train without it")
        # Cached items: ``latent_dist`` with the ``original_size`` / ``crop_top_left`` of the encoded crop.
        self._latents: list[dict[str, torch.Tensor]] | None = None
        self._class_latents: list[dict[str, torch.Tensor]] | None = None

    def _with_condition(self, record: ImageRecord, condition_root: Path, image_root: Path | None,
                        skip_bad: bool) -> ImageRecord:
        """``record`` with its condition file; without one, an error, or (``skip_bad``) no condition."""
        relative = record.path.relative_to(image_root) if image_root is not None else Path(record.path.name)
        candidates = [condition_root / relative] + [
            (condition_root / relative).with_suffix(ext) for ext in IMAGE_EXTENSIONS if ext != relative.suffix.lower()
        ]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            if skip_bad:
                return ImageRecord(record.path, record.caption)
            raise DataError(
                f"no condition image for {record.path}: expected {condition_root / relative} (same relative name, "
                f"any image extension); add it, or {self.skip_hint} to drop images without one"
            )
        return ImageRecord(record.path, record.caption, found)

    def _problem(self, record: ImageRecord) -> str | None:
        """Why a training image or its condition cannot be used, or ``None``."""
        reason = image_problem(record.path)
        if reason is not None or record.condition is None:
            return reason
        try:
            condition = condition_to_mode(open_image(record.condition), self.condition_channels, record.condition)
        except DataError as exc:
            return str(exc)
        return pairing_problem(record.path, open_image(record.path).size, record.condition, condition.size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops, flips and caption dropout the items use."""
        self.epoch = epoch

    def __len__(self) -> int:
        # DreamBooth: every step sees an instance image and a class image; the longer list sets the length.
        return max(len(self.records), len(self.class_records))

    # -- geometry --

    def _geometry(self, size: tuple[int, int], rng: random.Random) -> tuple[tuple[int, int], tuple[int, int], bool]:
        """(resized width/height, crop top/left, flip) for an image of ``size`` (width, height)."""
        rw, rh = resized_size(size, self.resolution)
        if self.crop == "center":
            top, left = (rh - self.resolution) // 2, (rw - self.resolution) // 2
        else:
            top, left = rng.randint(0, rh - self.resolution), rng.randint(0, rw - self.resolution)
        flip = self.flip and rng.random() < 0.5
        return (rw, rh), (top, left), flip

    def _apply(self, image: Image.Image, resized: tuple[int, int], top_left: tuple[int, int], flip: bool,
               resample: int) -> Image.Image:
        top, left = top_left
        image = image.resize(resized, resample=resample)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image

    # -- items --

    def _load(self, record: ImageRecord, rng: random.Random) -> dict[str, Any]:
        image = open_image(record.path, self.skip_hint)
        resized, top_left, flip = self._geometry(image.size, rng)
        item: dict[str, Any] = {
            "original_size": torch.tensor([image.size[1], image.size[0]]),
            "crop_top_left": torch.tensor(list(top_left)),
        }
        rgb = self._apply(image.convert("RGB"), resized, top_left, flip, Image.Resampling.BILINEAR)
        item["pixel_values"] = pil_to_tensor(rgb) * 2.0 - 1.0
        if record.condition is not None:
            condition = condition_to_mode(open_image(record.condition, self.skip_hint), self.condition_channels,
                                          record.condition)
            if condition.size != image.size:
                problem = pairing_problem(record.path, image.size, record.condition, condition.size)
                if problem is not None:
                    raise DataError(f"{problem}, or {self.skip_hint} to drop such pairs")
                # Resized to the image first, so the crop box means the same pixels in both.
                condition = condition.resize(image.size, resample=Image.Resampling.BILINEAR)
            item["condition"] = pil_to_tensor(self._apply(condition, resized, top_left, flip,
                                                          Image.Resampling.BILINEAR))
        elif self.condition_kind is not None:
            from visionpeft.diffusion.conditions import extract

            # Extracted from the training-size image: an edge map shrunk afterwards would be faint and blurred.
            condition = condition_to_mode(extract(rgb, self.condition_kind), self.condition_channels,
                                          f"{record.path} ({self.condition_kind})")
            item["condition"] = pil_to_tensor(condition)
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = _item_rng(self.seed, self.epoch, index)
        record = self.records[index % len(self.records)]
        if self._latents is not None:
            item = dict(self._latents[index % len(self.records)])
            if record.condition is not None or self.condition_kind is not None:
                item["condition"] = self._load(record, rng)["condition"]
        else:
            item = self._load(record, rng)
        caption = record.caption
        if self.caption_dropout and rng.random() < self.caption_dropout:
            caption = ""
        item["prompt"] = caption
        if self.class_records:
            class_index = index % len(self.class_records)
            class_record = self.class_records[class_index]
            if self._class_latents is not None:
                cached = self._class_latents[class_index]
                item["class_latent_dist"] = cached["latent_dist"]
                item["class_original_size"] = cached["original_size"]
                item["class_crop_top_left"] = cached["crop_top_left"]
            else:
                class_item = self._load(class_record, _item_rng(self.seed, self.epoch, index, salt=1))
                item["class_pixel_values"] = class_item["pixel_values"]
                item["class_original_size"] = class_item["original_size"]
                item["class_crop_top_left"] = class_item["crop_top_left"]
            item["class_prompt"] = class_record.caption
        return item

    # -- latent caching --

    def set_latent_cache(self, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 8) -> None:
        """Encode every image once with ``encode`` (pixels → VAE posterior parameters) and reuse it.

        Only for deterministic geometry (center crop, no flip): a cached latent cannot be
        re-cropped or flipped.
        """
        if self.crop != "center" or self.flip:
            raise DataError(
                "data.cache_latents needs data.crop: center and data.flip: false (latents are encoded once)"
            )
        self._latents = self._encode_all(self.records, encode, batch_size)
        if self.class_records:
            self._class_latents = self._encode_all(self.class_records, encode, batch_size)

    def _encode_all(self, records: list[ImageRecord], encode: Callable[[torch.Tensor], torch.Tensor],
                    batch_size: int) -> list[dict[str, torch.Tensor]]:
        rng = random.Random(0)
        out: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(records), batch_size):
            loaded = [self._load(ImageRecord(r.path, r.caption), rng) for r in records[start : start + batch_size]]
            latents = encode(torch.stack([i["pixel_values"] for i in loaded])).detach().to("cpu", torch.float32)
            out.extend({"latent_dist": latent, "original_size": i["original_size"], "crop_top_left": i["crop_top_left"]}
                       for latent, i in zip(latents.unbind(0), loaded, strict=True))
        return out


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a float ``(C, H, W)`` tensor in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def collate(items: list[dict[str, Any]], tokenize: Callable[[list[str]], dict[str, torch.Tensor]]) -> dict[str, Any]:
    """One batch of training items (token ids from ``tokenize``).

    With class images, the class half follows the instance half along the batch (one forward for
    both, as diffusers' DreamBooth script) and ``is_class`` marks its rows.
    """
    prompts = [i["prompt"] for i in items]
    latent_key = "latent_dist" if "latent_dist" in items[0] else "pixel_values"
    images = [i[latent_key] for i in items]
    sizes = [i["original_size"] for i in items]
    crops = [i["crop_top_left"] for i in items]
    is_class = [False] * len(items)
    if "class_prompt" in items[0]:
        prompts += [i["class_prompt"] for i in items]
        images += [i["class_latent_dist" if latent_key == "latent_dist" else "class_pixel_values"] for i in items]
        sizes += [i["class_original_size"] for i in items]
        crops += [i["class_crop_top_left"] for i in items]
        is_class += [True] * len(items)
    batch: dict[str, Any] = {latent_key: torch.stack(images), **tokenize(prompts),
                             "original_size": torch.stack(sizes), "crop_top_left": torch.stack(crops),
                             "is_class": torch.tensor(is_class)}
    if "condition" in items[0]:
        if "class_prompt" in items[0]:
            raise DataError("prior preservation (class images) and T2I-Adapter conditions do not combine")
        batch["condition"] = torch.stack([i["condition"] for i in items])
    return batch
