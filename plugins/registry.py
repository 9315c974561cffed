"""The method registry: string names to method classes, filled lazily from entry points.

Methods are declared as entry points in the group ``visionpeft.methods`` (this package declares
its own there too, exactly as a third-party package would). Listing reads the entry points'
names and the classes' descriptions; method modules must import their heavy libraries (timm,
open_clip, diffusers, peft) inside functions, so listing stays cheap.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from visionpeft.config import MethodConfig
from visionpeft.errors import RegistryError, UnknownMethodError

if TYPE_CHECKING:
    from visionpeft.method import Method

ENTRY_POINT_GROUP = "visionpeft.methods"
#: the domain of generic methods, which adapt models of every domain
CORE_DOMAIN = "core"
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*[a-z0-9]")

_methods: dict[str, type[Method]] = {}
_lock = threading.RLock()
_entry_points_loaded = False


@dataclass(frozen=True)
class MethodInfo:
    """What :func:`visionpeft.methods` lists for one registered method."""

    name: str
    domain: str
    description: str
    mergeable: bool

    def __str__(self) -> str:
        return f"{self.name:<20} {self.domain:<10} {self.description}"


def _validate(cls: type) -> None:
    from visionpeft.method import Method

    name = getattr(cls, "name", None)
    if not isinstance(cls, type) or not issubclass(cls, Method):
        raise RegistryError(f"{cls!r} is not a subclass of visionpeft.method.Method")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise RegistryError(
            f"{cls.__qualname__}.name = {name!r}: a method name is lower case letters, digits and "
            "underscores, starting with a letter"
        )
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, MethodConfig)):
        raise RegistryError(f"method {name!r} ({cls.__qualname__}) has no Config dataclass deriving MethodConfig")
    domain = getattr(cls, "domain", None)
    if not isinstance(domain, str) or not _NAME_RE.fullmatch(domain):
        raise RegistryError(
            f"method {name!r}: domain {domain!r} must name the method's domain in lower case ({CORE_DOMAIN!r} for "
            "generic methods, else the domain package's name, e.g. 'vit')"
        )
    if not getattr(cls, "description", ""):
        raise RegistryError(f"method {name!r}: give the class a one-line `description`")


def register_method(cls: type[Method]) -> type[Method]:
    """Register a method class under its ``name``; usable as a class decorator.

    Raises :class:`RegistryError` for a duplicate name, a class without a ``Config`` dataclass, a
    malformed name or an unknown domain, so a broken plugin fails where it is declared.
    """
    _validate(cls)
    with _lock:
        existing = _methods.get(cls.name)
        if existing is not None and existing is not cls:
            raise RegistryError(
                f"method {cls.name!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
                f"{cls.__module__}.{cls.__qualname__} must use another name"
            )
        owner = cls.Config.__dict__.get("method")
        if owner and owner != cls.name and owner in _methods and _methods[owner] is not cls:
            # The config records its method's name, so a shared Config would build the wrong method.
            raise RegistryError(
                f"method {cls.name!r}: its Config {cls.Config.__qualname__} is already the config of method "
                f"{owner!r}; give each method its own Config (a subclass will do)"
            )
        cls.Config.method = cls.name
        _methods[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove a method from the registry (for tests and interactive sessions)."""
    with _lock:
        _methods.pop(name, None)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        other = found.get(ep.name)
        if other is not None and other.value != ep.value:
            raise RegistryError(
                f"method {ep.name!r} is declared twice in entry point group {ENTRY_POINT_GROUP!r}: "
                f"{other.value} and {ep.value}; uninstall one of the packages"
            )
        found[ep.name] = ep
    return found


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> type[Method]:
    try:
        cls = ep.load()
    except ImportError as err:
        raise UnknownMethodError(
            f"method {ep.name!r} is declared by {ep.value} but could not be imported ({err}); install "
            "its extra, e.g. pip install 'visionpeft[all]'"
        ) from err
    if getattr(cls, "name", None) != ep.name:
        raise RegistryError(f"entry point {ep.name!r} points to {ep.value}, whose name is {cls.name!r}")
    return register_method(cls)


def _ensure_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        for name, ep in _entry_points().items():
            if name not in _methods:
                _load_entry_point(ep)
        _entry_points_loaded = True


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``.

    Raises :class:`UnknownMethodError` listing the known names and the closest match.
    """
    if not isinstance(name, str):
        raise UnknownMethodError(f"a method name is a string, got {name!r}")
    with _lock:
        if name in _methods:
            return _methods[name]
        _ensure_entry_points()
        if name in _methods:
            return _methods[name]
        known = sorted(_methods)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownMethodError(f"unknown method {name!r}.{hint} Registered methods: {', '.join(known) or 'none'}")


def list_methods(domain: str | None = None) -> list[MethodInfo]:
    """Every registered method, sorted by name; ``domain`` keeps one domain's methods.

    Generic methods (domain ``"core"``) adapt models of every domain, so they are listed with
    each domain as well.
    """
    _ensure_entry_points()
    with _lock:
        classes = sorted(_methods.values(), key=lambda c: c.name)
    if domain is not None and domain not in list_domains():
        raise UnknownMethodError(f"unknown domain {domain!r}; the installed methods' domains are {list_domains()}")
    return [
        MethodInfo(c.name, c.domain, c.description, c.mergeable)
        for c in classes
        if domain is None or c.domain in (domain, "core")
    ]


def list_domains() -> list[str]:
    """The domains of the registered methods (``core`` first), read from the methods themselves."""
    _ensure_entry_points()
    with _lock:
        domains = {c.domain for c in _methods.values()}
    return [CORE_DOMAIN, *sorted(domains - {CORE_DOMAIN})]
