"""Packaging: the folder-to-package mapping works for editable and wheel installs alike."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import visionpeft

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["visionpeft", "visionpeft.generic", "visionpeft.vit", "visionpeft.vla", "visionpeft.diffusion"]


def test_editable_install_maps_the_folders():
    import visionpeft.diffusion
    import visionpeft.vit
    import visionpeft.vla

    assert Path(visionpeft.__file__).parent == ROOT / "plugins"
    assert Path(visionpeft.vit.__file__).parent == ROOT / "vit"
    assert Path(visionpeft.vla.__file__).parent == ROOT / "vla"
    assert Path(visionpeft.diffusion.__file__).parent == ROOT / "diffusion"


def test_wheel_install_imports_every_package(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True, timeout=300,
    )
    wheel = next(dist.glob("visionpeft-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in PACKAGES:
        assert package.replace(".", "/") + "/__init__.py" in names
    assert "visionpeft/generic/lora.py" in names
    assert not any(n.startswith(("plugins/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[visionpeft.methods]" in text and "lora = visionpeft.generic.lora:LoRA" in text
    assert "visionpeft = visionpeft.cli:main" in text

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        check=True, timeout=300,
    )
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r}); "
        + "; ".join(f"import {p}" for p in PACKAGES)
        + f"; assert visionpeft.__file__.startswith({str(site)!r}), visionpeft.__file__"
        + "; assert {m.name for m in visionpeft.methods()} >= {'bitfit', 'lora'}"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_version_is_single_sourced():
    from importlib.metadata import version

    assert version("visionpeft") == visionpeft.__version__
