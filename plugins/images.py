"""Reading and checking image files: what every domain's data readers share."""

from __future__ import annotations

import os

from PIL import Image, ImageOps

from visionpeft.errors import DataError

#: what to do about a bad image, for the readers that can skip them
SKIP_HINT = "pass skip_bad=True"


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
