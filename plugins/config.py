"""Typed, validated configs with a JSON round trip.

A method's hyper-parameters are a dataclass deriving from :class:`MethodConfig`; a run config's
sections (a domain's ``data`` keys, nested ``data.loss``) derive from :class:`Section`. Field types
come from the annotations; ranges come from field metadata (``ge``, ``gt``, ``le``, ``lt``), and a
key that only makes sense for some values of another (``num_frames`` for ``format: video``) says so
with ``only_for``. A bad value fails on construction with a :class:`~visionpeft.errors.ConfigError`
that names the key's path and what it accepts. Both kinds go through :func:`build_dataclass`.
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
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        return build_dataclass(annotation, value, f"{path}.")
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


def _applies(f: dataclasses.Field, data: typing.Mapping[str, Any], defaults: typing.Mapping[str, Any]) -> bool:
    """Whether field ``f`` may be given, by its ``only_for`` metadata and the other keys' values."""
    for other, allowed in f.metadata.get("only_for", {}).items():
        if data.get(other, defaults.get(other)) not in allowed:
            return False
    return True


def _yaml_value(value: Any) -> str:
    """A value as a YAML user writes it (``null``, ``true``, ``'vtab'``), for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def build_dataclass(cls: type, data: typing.Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys raise :class:`ConfigError` naming them.

    A field with ``only_for={"format": ("video",)}`` metadata is an unknown key unless ``format``
    (given, or its default) is one of those values; for such a dataclass the error says for which
    ``format`` the keys were refused and lists the keys that value allows (a ``format`` the
    dataclass itself refuses is reported first). In a :class:`Section`, a null value means the
    key's default; a field without a default that is not given is reported missing.
    """
    where = prefix.rstrip(".") or cls.__name__
    if not isinstance(data, typing.Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    if issubclass(cls, Section):
        # In a run-config section an empty YAML value (``key:``) is null and means "the default".
        data = {k: v for k, v in data.items() if v is not None}
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    allowed = [f.name for f in fields if _applies(f, data, defaults)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        if set(unknown) <= names:
            # Only keys another key's value rules out: a wrong value of that key is the real error.
            cls(**{k: v for k, v in data.items() if k not in unknown})
        conditions = sorted({k for f in fields for k in f.metadata.get("only_for", {})})
        context = "".join(f" for {k} {_yaml_value(data.get(k, defaults.get(k)))}" for k in conditions)
        raise ConfigError(f"{where}: unknown key(s) {unknown}{context}; allowed keys are {allowed}")
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    return cls(**data)


def field(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    only_for: typing.Mapping[str, typing.Iterable[Any]] | None = None,
    **bounds: Any,
) -> Any:
    """A dataclass field with a help text, optional ``ge``/``gt``/``le``/``lt`` bounds and ``only_for``.

    ``only_for={"format": ("video",)}``: the key may only be given when ``format`` is ``"video"``
    (see :func:`build_dataclass`). Mutable defaults (lists, dicts, nested sections) are copied for
    every instance.
    """
    meta: dict[str, Any] = {"help": help, **bounds}
    if only_for:
        meta["only_for"] = {k: tuple(v) for k, v in only_for.items()}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        section = default
        return dataclasses.field(default_factory=lambda: dataclasses.replace(section), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def plain(value: Any) -> Any:
    """A config value as plain YAML / JSON data: nested dataclasses as mappings, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass
class Section:
    """Base class of a run-config section that a domain declares (its ``data`` keys, ``data.loss``).

    Subclasses are dataclasses whose fields carry the defaults, types and bounds; ``prefix`` is the
    section's key path with a trailing dot (``"data."``), so that errors name ``data.image_size``.
    Validation runs on construction; override :meth:`check` for rules that involve several keys.
    """

    prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        validate_fields(self, self.prefix)
        self.check()

    def check(self) -> None:
        """Cross-key validation; raise :class:`ConfigError` naming the keys involved."""

    def to_dict(self) -> dict[str, Any]:
        """The section as plain data (nested sections as mappings), without keys that do not apply.

        A key whose ``only_for`` condition the other keys do not meet is left out, so the result
        parses back into an equal section.
        """
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {
            f.name: plain(given[f.name]) for f in dataclasses.fields(self) if f.init and _applies(f, given, {})
        }


def offer(config: Any, given: typing.Iterable[str] = (), **values: Any) -> Any:
    """``config`` with each of ``values`` set whose field it declares and the user did not set.

    This is how a task hands a method what only the task knows (the data set's class names, the
    model's tokenizer): a method that wants a value declares a config field of that name. A field
    named in ``given`` (the keys the user wrote, ``RunConfig.method_keys``) keeps its value, and so
    does one that differs from its default. The result is a new, validated config; ``config`` is
    unchanged.
    """
    given = set(given)
    updates = {}
    for f in dataclasses.fields(config):
        if f.name not in values or f.name in given:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if getattr(config, f.name) == default:
            updates[f.name] = values[f.name]
    return dataclasses.replace(config, **updates) if updates else config


def declares(config_cls: type, name: str) -> bool:
    """Whether the config dataclass ``config_cls`` has a field ``name`` (what a method takes from a task)."""
    return any(f.name == name for f in dataclasses.fields(config_cls))


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
