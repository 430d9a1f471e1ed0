"""Python type hints -> JSON Schema, and JSON values -> typed Python values (and back).

Pure Python with no WIT dependency, so it runs (and is unit-tested) under a normal CPython as
well as inside the component. The supported types are the ones that have an obvious JSON form:

    str, int, float, bool, None, Any, list[T], tuple[T, ...], dict[str, T], Optional[T], T | U,
    Literal[...], Enum subclasses, dataclasses, TypedDicts, Annotated[T, "description"]

Anything else is refused when the tool is declared (at build time), not when it is first called.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any

__all__ = ["SchemaError", "ConversionError", "schema_of", "from_json", "to_json"]


class SchemaError(TypeError):
    """A type hint has no JSON Schema form: raised while a tool is declared."""


class ConversionError(ValueError):
    """A JSON value does not fit the declared type; `path` says where (`$.items[2].name`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


_NONE_TYPE = type(None)


def _is_typeddict(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__required_keys__")


def _split_annotated(tp: Any) -> tuple[Any, str | None]:
    """`Annotated[T, "text", ...]` -> (T, "text"); other types -> (tp, None)."""
    if typing.get_origin(tp) is typing.Annotated:
        base, *extras = typing.get_args(tp)
        text = next((e for e in extras if isinstance(e, str)), None)
        return base, text
    return tp, None


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def _hints(tp: Any) -> dict[str, Any]:
    """Resolved type hints of a class (dataclass or TypedDict), keeping `Annotated`."""
    return typing.get_type_hints(tp, include_extras=True)


def _field_docs(tp: Any) -> dict[str, str]:
    """Attribute descriptions from the class docstring's `Attributes:` section."""
    from ._docstring import parse

    return parse(tp.__doc__ or "").params


def schema_of(tp: Any, _seen: frozenset = frozenset()) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12, inline, no `$ref`) of the type hint `tp`."""
    tp, description = _split_annotated(tp)
    schema = _schema_of(tp, _seen)
    if description:
        schema = {**schema, "description": description}
    return schema


def _schema_of(tp: Any, seen: frozenset) -> dict[str, Any]:
    if tp is Any or tp is object:
        return {}
    if tp is None or tp is _NONE_TYPE:
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_union(origin):
        options = [schema_of(a, seen) for a in args]
        return {"anyOf": options}
    if origin is typing.Literal:
        for value in args:
            if not isinstance(value, (str, int, bool)) and value is not None:
                raise SchemaError(f"Literal values must be str, int, bool or None, not {value!r}")
        return {"enum": list(args)}
    if tp is list or origin is list or origin is typing.Sequence or _is_abc(origin, "Sequence"):
        item = args[0] if args else Any
        return {"type": "array", "items": schema_of(item, seen)}
    if tp is tuple or origin is tuple:
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return {"type": "array", "items": schema_of(item, seen)}
        items = [schema_of(a, seen) for a in args]
        return {
            "type": "array",
            "prefixItems": items,
            "items": False,
            "minItems": len(items),
        }
    if tp is dict or origin is dict or _is_abc(origin, "Mapping"):
        key, value = args if args else (str, Any)
        if key is not str:
            raise SchemaError(f"dict keys must be str (JSON object keys), not {key!r}")
        return {"type": "object", "additionalProperties": schema_of(value, seen)}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        for value in values:
            if not isinstance(value, (str, int)):
                raise SchemaError(f"enum {tp.__name__} values must be str or int, not {value!r}")
        return {"enum": values, **_doc(tp)}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _object_schema(tp, seen, _dataclass_fields(tp))
    if _is_typeddict(tp):
        hints = _hints(tp)
        required = tp.__required_keys__
        return _object_schema(tp, seen, [(name, hint, name in required) for name, hint in hints.items()])
    raise SchemaError(f"type {tp!r} has no JSON Schema form (use str, int, float, bool, list, dict, a dataclass, ...)")


def _is_abc(origin: Any, name: str) -> bool:
    import collections.abc

    return origin is getattr(collections.abc, name)


def _doc(tp: type) -> dict[str, str]:
    from ._docstring import parse

    summary = parse(tp.__doc__ or "").summary
    # Dataclasses and enums get a generated docstring (the signature) when none was written.
    if not summary or summary.startswith(tp.__name__ + "("):
        return {}
    return {"description": summary}


def _dataclass_fields(tp: type) -> list[tuple[str, Any, bool]]:
    hints = _hints(tp)
    out = []
    for field in dataclasses.fields(tp):
        if not field.init:
            continue
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        out.append((field.name, hints[field.name], required))
    return out


def _object_schema(tp: type, seen: frozenset, fields: list[tuple[str, Any, bool]]) -> dict[str, Any]:
    if tp in seen:
        raise SchemaError(f"recursive type {tp.__name__} is not supported")
    seen = seen | {tp}
    docs = _field_docs(tp)
    properties = {}
    for name, hint, _ in fields:
        prop = schema_of(hint, seen)
        if name in docs and "description" not in prop:
            prop = {**prop, "description": docs[name]}
        properties[name] = prop
    schema: dict[str, Any] = {"type": "object", **_doc(tp), "properties": properties}
    required = [name for name, _, req in fields if req]
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    return schema


def from_json(tp: Any, value: Any, path: str = "$") -> Any:
    """Check `value` (parsed JSON) against `tp` and convert it: dicts become dataclasses, strings
    and ints become Enum members, JSON arrays become tuples where a tuple is declared."""
    tp, _ = _split_annotated(tp)
    if tp is Any or tp is object:
        return value
    if tp is None or tp is _NONE_TYPE:
        if value is not None:
            raise ConversionError(path, f"expected null, got {_kind(value)}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConversionError(path, f"expected a boolean, got {_kind(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            # JSON has one number type: 3.0 is an integer to JSON Schema.
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConversionError(path, f"expected an integer, got {_kind(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConversionError(path, f"expected a number, got {_kind(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConversionError(path, f"expected a string, got {_kind(value)}")
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_union(origin):
        errors = []
        # None first, so Optional[T] with null never tries T.
        for option in sorted(args, key=lambda a: a is not _NONE_TYPE):
            try:
                return from_json(option, value, path)
            except ConversionError as e:
                errors.append(e.message)
        raise ConversionError(path, "matches none of: " + "; ".join(errors))
    if origin is typing.Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return value
        raise ConversionError(path, f"expected one of {list(args)!r}, got {value!r}")
    if tp is list or origin is list or origin is typing.Sequence or _is_abc(origin, "Sequence"):
        if not isinstance(value, list):
            raise ConversionError(path, f"expected an array, got {_kind(value)}")
        item = args[0] if args else Any
        return [from_json(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is tuple or origin is tuple:
        if not isinstance(value, list):
            raise ConversionError(path, f"expected an array, got {_kind(value)}")
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(from_json(item, v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConversionError(path, f"expected an array of {len(args)} items, got {len(value)}")
        return tuple(from_json(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is dict or origin is dict or _is_abc(origin, "Mapping"):
        if not isinstance(value, dict):
            raise ConversionError(path, f"expected an object, got {_kind(value)}")
        item = args[1] if args else Any
        return {k: from_json(item, v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if member.value == value and type(member.value) is type(value):
                return member
        raise ConversionError(path, f"expected one of {[m.value for m in tp]!r}, got {value!r}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        fields = _dataclass_fields(tp)
        return tp(**_object_from_json(tp, fields, value, path))
    if _is_typeddict(tp):
        hints = _hints(tp)
        required = tp.__required_keys__
        fields = [(name, hint, name in required) for name, hint in hints.items()]
        return _object_from_json(tp, fields, value, path)
    raise ConversionError(path, f"unsupported type {tp!r}")


def _object_from_json(tp: type, fields: list[tuple[str, Any, bool]], value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConversionError(path, f"expected an object, got {_kind(value)}")
    known = {name for name, _, _ in fields}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConversionError(path, f"unknown field `{unknown[0]}` (expected {', '.join(sorted(known)) or 'none'})")
    out = {}
    for name, hint, required in fields:
        if name in value:
            out[name] = from_json(hint, value[name], f"{path}.{name}")
        elif required:
            raise ConversionError(path, f"missing field `{name}`")
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def to_json(value: Any, path: str = "$") -> Any:
    """Turn a tool's return value into plain JSON data: dataclasses become objects (fields in
    declaration order), Enum members their values, tuples arrays. Non-finite floats and other
    objects are refused, because JSON cannot carry them."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConversionError(path, f"{value} is not a JSON number")
        return value
    if isinstance(value, enum.Enum):
        return to_json(value.value, path)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name), f"{path}.{f.name}") for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConversionError(path, f"object key {k!r} is not a string")
            out[k] = to_json(v, f"{path}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_json(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise ConversionError(path, f"{type(value).__name__} is not JSON data")
