"""The method registry: entry points, listing, and errors at the door."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import visionpeft as vp
from visionpeft.config import MethodConfig, field
from visionpeft.errors import RegistryError, UnknownMethodError
from visionpeft.method import Method
from visionpeft.registry import get_method, register_method, unregister_method


@dataclasses.dataclass
class _Cfg(MethodConfig):
    size: int = field(4, ge=1)


def _method(name: str, **attrs) -> type[Method]:
    body = {"name": name, "domain": "core", "description": "a test method", "Config": _Cfg, **attrs}
    return type(f"M_{name}", (Method,), body)


def test_own_methods_come_from_entry_points():
    names = {m.name for m in vp.methods()}
    assert {"lora", "bitfit"} <= names
    info = {m.name: m for m in vp.methods()}["lora"]
    assert info.domain == "core" and info.mergeable and info.description


def test_listing_imports_no_domain_library():
    code = (
        "import sys, visionpeft as vp; vp.methods(); "
        "bad = [m for m in ('timm', 'open_clip', 'diffusers', 'transformers', 'peft') if m in sys.modules]; "
        "print(bad); raise SystemExit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_domain_filter_lists_core_methods_with_every_domain():
    assert {m.name for m in vp.methods("vit")} >= {"lora", "bitfit"}
    assert all(m.domain in ("vla", "core") for m in vp.methods("vla"))
    with pytest.raises(UnknownMethodError, match="unknown domain"):
        vp.methods("audio")


def test_unknown_name_lists_known_ones_and_the_closest():
    with pytest.raises(UnknownMethodError) as err:
        vp.config("loar")
    message = str(err.value)
    assert "Did you mean 'lora'" in message and "bitfit" in message


def test_duplicate_name_is_an_error():
    with pytest.raises(RegistryError, match="already registered"):
        register_method(_method("lora"))


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        ({"Config": None}, "no Config dataclass"),
        ({"Config": dict}, "no Config dataclass"),
        ({"domain": "Audio Models"}, "domain"),
        ({"description": ""}, "description"),
    ],
)
def test_malformed_classes_are_rejected(attrs, match):
    with pytest.raises(RegistryError, match=match):
        register_method(_method("broken", **attrs))


@pytest.mark.parametrize("name", ["Bad", "1x", "with-dash", "trailing_", ""])
def test_bad_names_are_rejected(name):
    with pytest.raises(RegistryError, match="method name"):
        register_method(_method(name))


def test_third_party_registration_round_trip():
    cls = register_method(_method("toy_extra"))
    try:
        assert get_method("toy_extra") is cls
        assert "toy_extra" in {m.name for m in vp.methods()}
        assert vp.config("toy_extra", size=3).size == 3
    finally:
        unregister_method("toy_extra")
    with pytest.raises(UnknownMethodError):
        get_method("toy_extra")


def test_two_methods_cannot_share_a_config_class():
    """A config records its method's name, so a shared Config would silently build the other method."""
    first = register_method(_method("toy_first"))
    try:
        with pytest.raises(RegistryError, match="already the config of method 'toy_first'"):
            register_method(_method("toy_second"))
        assert vp.config("toy_first").method == "toy_first"
    finally:
        unregister_method("toy_first")
    assert first.Config.method == "toy_first"
