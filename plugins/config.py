"""Typed, validated configs with a JSON round trip.

A method's hyper-parameters are a dataclass deriving from :class:`MethodConfig`. Field types come
from the annotations; ranges come from field metadata (``ge``, ``gt``, ``le``, ``lt``), so a bad
value fails on construction with a :class:`~visionpeft.errors.ConfigError` that names the field and
what it accepts. The same checker validates the sections of a run config.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, ClassVar, Literal, Union

from visionpeft.errors import ConfigError

CONFIG_FORMAT_VERSION = 1


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def check_value(value: Any, annotation: Any, path: str) -> Any:
    """Check ``value`` against a type annotation and return it, normalised.

    Ints are accepted where floats are expected (and become floats); lists and tuples are
    accepted for sequence types (and become tuples for ``tuple`` fields, lists for ``list``);
    ``bool`` is never taken for a number. Raises :class:`ConfigError` naming ``path``.
    """
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return check_value(value, option, path)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{path}: expected {_type_name(annotation)}, got {value!r}")
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {value!r}")
        return None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(annotation)}, got {value!r}")
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        items = [check_value(v, args[0], f"{path}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{path}: expected {_type_name(annotation)}, got {value!r}")
    return value


def check_range(value: Any, meta: typing.Mapping[str, Any], path: str) -> None:
    """Check a number against the ``ge`` / ``gt`` / ``le`` / ``lt`` bounds in field metadata."""
    if value is None or isinstance(value, bool):
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not isinstance(v, (int, float)):
            continue
        bounds = []
        if "ge" in meta:
            bounds.append(f">= {meta['ge']}")
        if "gt" in meta:
            bounds.append(f"> {meta['gt']}")
        if "le" in meta:
            bounds.append(f"<= {meta['le']}")
        if "lt" in meta:
            bounds.append(f"< {meta['lt']}")
        ok = (
            ("ge" not in meta or v >= meta["ge"])
            and ("gt" not in meta or v > meta["gt"])
            and ("le" not in meta or v <= meta["le"])
            and ("lt" not in meta or v < meta["lt"])
        )
        if not ok:
            raise ConfigError(f"{path}: {v!r} is out of range; it must be {' and '.join(bounds)}")


def validate_fields(obj: Any, prefix: str = "") -> None:
    """Type- and range-check every field of a dataclass instance in place."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        path = f"{prefix}{f.name}"
        value = check_value(getattr(obj, f.name), hints[f.name], path)
        check_range(value, f.metadata, path)
        object.__setattr__(obj, f.name, value)


def build_dataclass(cls: type, data: typing.Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys raise :class:`ConfigError` naming them."""
    if not isinstance(data, typing.Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = prefix.rstrip(".") or cls.__name__
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys are {names}")
    return cls(**data)


def field(default: Any = dataclasses.MISSING, *, help: str = "", **bounds: Any) -> Any:
    """A dataclass field with a help text and optional ``ge``/``gt``/``le``/``lt`` bounds."""
    meta = {"help": help, **bounds}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class MethodConfig:
    """Base class of every method's config.

    Subclasses are dataclasses whose fields carry the paper's defaults. Validation runs on
    construction; override :meth:`check` for rules that involve several fields.
    """

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        validate_fields(self, f"{self.method or type(self).__name__}.")
        self.check()

    def check(self) -> None:
        """Cross-field validation; raise :class:`ConfigError` naming the fields involved."""

    def to_dict(self) -> dict[str, Any]:
        """The config's fields as plain JSON types."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        """A JSON document with the format version, the method name and the fields."""
        payload = {"format_version": CONFIG_FORMAT_VERSION, "method": self.method, "config": self.to_dict()}
        return json.dumps(payload, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: typing.Mapping[str, Any]) -> MethodConfig:
        """Build and validate the config from a mapping of field values."""
        return build_dataclass(cls, data, prefix=f"{cls.method or cls.__name__}.")

    @classmethod
    def from_json(cls, text: str) -> MethodConfig:
        """Inverse of :meth:`to_json`; rejects other methods and unknown format versions."""
        payload = json.loads(text)
        version = payload.get("format_version")
        if version != CONFIG_FORMAT_VERSION:
            raise ConfigError(
                f"config format_version {version!r} is not supported (this visionpeft reads version "
                f"{CONFIG_FORMAT_VERSION}); upgrade visionpeft or re-save the adapter"
            )
        if cls.method and payload.get("method") != cls.method:
            raise ConfigError(f"config is for method {payload.get('method')!r}, not {cls.method!r}")
        return cls.from_dict(payload.get("config", {}))
