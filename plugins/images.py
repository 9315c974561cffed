"""Checks on image files that every domain's data readers share."""

from __future__ import annotations

import os

from PIL import Image


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
