"""Typed config fields: coerce a value read from YAML, JSON or ``--set key=value`` to its annotated type.

PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string and ``2.0e-3`` a float; JSON and hand-written dicts
bring their own surprises (``"r": 2.5``, ``"batch_size": true``). Every config lorakit builds passes each field
through :func:`coerce`, so a value is either turned into the declared type or refused with a message that names
the field, the value and what to write instead. Pure functions, no imports from the rest of lorakit.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

__all__ = ["ConfigError", "coerce", "coerce_fields", "check_range"]


class ConfigError(ValueError):
    """A config value that has the wrong type or lies outside its range (the message names field and fix)."""


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return {"str": "a string", "int": "a whole number", "float": "a number", "bool": "true or false",
                "list": "a list", "dict": "a mapping"}.get(annotation.__name__, annotation.__name__)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return f"a list of {_type_name(item).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    return str(annotation)


def _fail(name: str, value: Any, annotation: Any, hint: str = "") -> ConfigError:
    return ConfigError(f"{name}={value!r}: expected {_type_name(annotation)}{hint}")


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` as the type ``annotation`` declares (``Any`` passes through).

    Numbers written as strings (``"1e-3"``) become numbers, ``2.0`` becomes ``2`` for an ``int`` field, ``"true"``
    becomes ``True`` for a ``bool`` field; a bool is never taken as a number, and a float with a fraction never as
    an int.

    Raises:
        ConfigError: naming ``name``, the value and the expected type.
    """
    if annotation is Any or annotation is None:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        if value is None:
            if type(None) in members:
                return None
            raise _fail(name, value, annotation)
        for member in members:  # an exact match first: "all-linear" stays a string, [..] stays a list
            if _is_exact(value, member):
                return coerce(value, member, name)
        for member in members:
            if member is type(None):
                continue
            try:
                return coerce(value, member, name)
            except ConfigError:
                continue
        raise _fail(name, value, annotation)
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise _fail(name, value, annotation)
        return [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, item = typing.get_args(annotation) or (Any, Any)
        if not isinstance(value, dict):
            raise _fail(name, value, annotation)
        return {coerce(k, key_type, f"{name} key"): coerce(v, item, f"{name}[{k!r}]") for k, v in value.items()}
    if annotation is bool:
        return _to_bool(value, name)
    if annotation is int:
        return _to_int(value, name)
    if annotation is float:
        return _to_float(value, name)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _fail(name, value, annotation, hint=f" (quote it if you mean the text {value!r})")
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _fail(name, value, annotation)
    return value


def _is_exact(value: Any, member: Any) -> bool:
    if member is type(None):
        return value is None
    origin = typing.get_origin(member)
    if origin is not None:
        return isinstance(value, origin)
    if member is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if member is float:
        return isinstance(value, float)
    return isinstance(member, type) and isinstance(value, member)


def _to_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _fail(name, value, bool)


def _to_float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise _fail(name, value, float)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _fail(name, value, float, hint=" such as 2e-4 or 0.0002")


def _to_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise _fail(name, value, int)
    if isinstance(value, int):
        return value
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value.strip())
            except ValueError:
                raise _fail(name, value, int) from None
    if isinstance(number, float):
        if math.isfinite(number) and number.is_integer():
            return int(number)
        raise _fail(name, value, int, hint=f" (got a fraction; use {math.floor(number)} or {math.ceil(number)})"
                    if math.isfinite(number) else "")
    raise _fail(name, value, int)


def coerce_fields(cls: type, data: dict[str, Any], source: str = "") -> dict[str, Any]:
    """Every ``data[key]`` coerced to the type of ``cls``'s field ``key`` (keys must already be fields).

    ``source`` (a file name) prefixes the error message.
    """
    hints = typing.get_type_hints(cls)
    prefix = f"{source}: " if source else ""
    out = {}
    for key, value in data.items():
        try:
            out[key] = coerce(value, hints.get(key, Any), key)
        except ConfigError as err:
            raise ConfigError(f"{prefix}{err}") from None
    return out


def check_range(name: str, value: float, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, fix: str = "") -> None:
    """Refuse a non-finite ``value`` or one outside [low, high] (open ends with ``low_open`` / ``high_open``).

    Raises:
        ConfigError: ``"lr=inf must be a finite number greater than 0"``, plus ``fix``.
    """
    bad = not math.isfinite(value)
    parts = []
    if low is not None:
        bad |= value <= low if low_open else value < low
        parts.append(f"{'greater than' if low_open else 'at least'} {low:g}")
    if high is not None:
        bad |= value >= high if high_open else value > high
        parts.append(f"{'below' if high_open else 'at most'} {high:g}")
    if bad:
        what = "a finite number" + (" " + " and ".join(parts) if parts else "")
        raise ConfigError(f"{name}={value!r} must be {what}" + (f"; {fix}" if fix else ""))
