"""Shared fixtures: offline mode, and the toy host every core test uses."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from visionpeft.hosts import register_host

from toy import TOY_HOST

register_host(TOY_HOST)
torch.set_num_threads(min(2, torch.get_num_threads()))


def has_cuda() -> bool:
    """Whether a CUDA device is usable."""
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when CUDA is not available, saying why."""
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
