"""Reading and checking image files: what every domain's data readers share."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from PIL import Image, ImageOps

from visionpeft.errors import DataError

logger = logging.getLogger("visionpeft")

#: the file extensions (lower case) that the readers take for images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

#: what to do about a bad image, for the readers that can skip them (run-config tasks pass their own)
SKIP_HINT = "pass skip_bad=True"

Item = TypeVar("Item")


def bad_image_message(path: str | os.PathLike, reason: str, hint: str = SKIP_HINT) -> str:
    """The message of an unusable image: the file, why, and what to do."""
    return f"cannot read image {path}: {reason}; fix or remove it, or {hint}"


def read_image(
    path: str | os.PathLike, *, mode: str | None = "RGB", exif_transpose: bool = False, hint: str = SKIP_HINT
) -> Image.Image:
    """The decoded image at ``path``, converted to ``mode`` (``None`` keeps the file's mode).

    ``exif_transpose`` applies the EXIF orientation (photos from cameras and phones). A missing or
    undecodable file raises :class:`~visionpeft.errors.DataError` naming it, with ``hint``.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return image.convert(mode) if mode is not None else image.copy()
    except FileNotFoundError:
        raise DataError(bad_image_message(path, "no such file", hint)) from None
    # PIL raises several types for broken files (OSError, SyntaxError, ValueError, DecompressionBombError).
    except Exception as exc:
        raise DataError(bad_image_message(path, f"{type(exc).__name__}: {exc}", hint)) from exc


def image_problem(path: str | os.PathLike) -> str | None:
    """Why the image at ``path`` cannot be used, or ``None`` if it opens, verifies and decodes.

    Readers call it up front when asked to skip bad images, so a corrupt file is dropped and
    counted instead of stopping a run halfway through an epoch.
    """
    if not os.path.isfile(path):
        return "no such file"
    try:
        # verify() checks the file's structure (e.g. PNG checksums) but leaves the image unusable,
        # and load() catches truncated data that verify() lets through, so both are needed.
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def drop_bad(
    items: Sequence[Item],
    path_of: Callable[[Item], Any],
    problem: Callable[[Item], str | None],
    *,
    source: Any,
    what: str = "unreadable image(s)",
) -> tuple[list[Item], list[Any]]:
    """The items for which ``problem`` finds nothing wrong, and the paths of the others.

    Each dropped item is logged (debug) with its reason, and one warning counts them and names
    the first, so a run that lost part of its data says so once instead of once per file.
    """
    kept, dropped = [], []
    for item in items:
        reason = problem(item)
        if reason is None:
            kept.append(item)
        else:
            dropped.append(path_of(item))
            logger.debug("skipping %s: %s", path_of(item), reason)
    if dropped:
        logger.warning("skipped %d of %d %s in %s (first: %s)", len(dropped), len(items), what, source, dropped[0])
    return kept, dropped


def check_images(
    items: Sequence[Item],
    path_of: Callable[[Item], str | os.PathLike],
    *,
    skip_bad: bool,
    source: Any,
    hint: str = SKIP_HINT,
    problem: Callable[[Item], str | None] | None = None,
) -> tuple[list[Item], list[Any]]:
    """The items of a data set whose image is usable, and the paths of the dropped ones.

    With ``skip_bad`` every image is opened and decoded once up front (:func:`image_problem`, or
    ``problem`` for readers that check more than the image) and the bad items are dropped
    (:func:`drop_bad`). Otherwise only the files' existence is checked: a stat per file is cheap
    and turns a crash hours into training into an error at the start, a
    :class:`~visionpeft.errors.DataError` naming the first missing file with ``hint``; an image
    that does not decode raises when it is read.
    """
    if skip_bad:
        return drop_bad(items, path_of, problem or (lambda item: image_problem(path_of(item))), source=source)
    missing = [path_of(item) for item in items if not os.path.isfile(path_of(item))]
    if missing:
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DataError(bad_image_message(missing[0], "no such file", hint) + more)
    return list(items), []
