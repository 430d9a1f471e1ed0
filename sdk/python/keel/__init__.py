"""keel — write Keel tool plugins in Python.

A tool is a decorated, type-annotated function. Its parameters become the input JSON Schema, its
return annotation the output schema, its docstring the description; `describe`, argument checking
and conversion, and the mapping of errors onto the WIT `tool-error` variant are generated::

    import keel

    keel.plugin("greeter", "0.1.0", "Greets people.")

    @keel.tool(idempotent=True)
    def greet(name: str) -> str:
        \"\"\"Greet someone by name.

        Args:
            name: Who to greet.
        \"\"\"
        if not name.strip():
            raise keel.InvalidInput("`name` must not be empty")
        return f"Hello, {name}!"

Build it into a `keel:plugin` component with `keel_build::python::build` (see README.md).

Nothing here imports the WIT bindings, so the SDK also runs under a normal CPython (for unit
tests of a tool's logic); only `keel._export` needs the component.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import traceback
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from . import _schema
from ._docstring import parse as _parse_docstring

__all__ = [
    "plugin",
    "tool",
    "Context",
    "LogLevel",
    "ToolError",
    "InvalidInput",
    "Denied",
    "Failed",
    "TimedOut",
]

_NAME = re.compile(r"^[a-z0-9_-]{1,64}$")


# --- Errors: one exception per WIT `tool-error` case -------------------------------------------


class ToolError(Exception):
    """Base of the errors a tool raises on purpose; each subclass is one WIT `tool-error` case.
    Any other exception escaping a tool becomes `failed` with its type and message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ToolError):
    """The arguments were unusable (`invalid-input`)."""


class Failed(ToolError):
    """The tool ran and failed (`failed`)."""


class TimedOut(ToolError):
    """The tool gave up because its deadline passed (`timed-out`)."""


class Denied(ToolError):
    """The tool needed a capability it was not granted (`denied`).

    `capability` is `filesystem`, `network` or `environment`; `target` the path, host or
    variable that was refused; `message` one sentence for a human."""

    def __init__(self, capability: str, target: str, message: str) -> None:
        super().__init__(message)
        self.capability = capability
        self.target = target


# --- The call context ----------------------------------------------------------------------------


class LogLevel(enum.Enum):
    """Severity of a host log line."""

    TRACE = "trace"
    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


@dataclass(frozen=True)
class Context:
    """Who is calling and under which deadline; `log` and `progress` reach the host.

    A tool receives it by declaring a parameter annotated `keel.Context` (any name); that
    parameter is not part of the input schema."""

    call_id: str = ""
    job_id: str | None = None
    scope: str = ""
    principal: str | None = None
    trace_id: str | None = None
    deadline_ms: int = 0

    def log(self, level: LogLevel, message: str) -> None:
        """Write a line to the host log, tagged with the plugin and call id."""
        from . import _export

        _export.log(level, message)

    def progress(self, fraction: float | None, message: str) -> None:
        """Report progress of this call (`fraction` in 0.0..=1.0 when known)."""
        from . import _export

        _export.progress(fraction, message)


# --- Declarations ----------------------------------------------------------------------------------


@dataclass
class Capabilities:
    """What a tool asks the host for; the host runs it with no more than this (and the grants)."""

    reads: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    connects: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)


@dataclass
class ToolSpec:
    """One declared tool: its handler, schemas and requests. Built by `@tool`."""

    name: str
    description: str
    handler: Callable[..., Any]
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    capabilities: Capabilities
    idempotent: bool
    params: dict[str, Any]
    context_param: str | None

    def invoke(self, ctx: Context, arguments_json: str) -> str:
        """Parse and check `arguments_json`, run the handler, return its result as compact JSON.
        Raises `ToolError` subclasses; any other exception propagates to the caller."""
        try:
            arguments = json.loads(arguments_json)
        except ValueError as e:
            raise InvalidInput(f"arguments are not JSON: {e}") from None
        if not isinstance(arguments, dict):
            raise InvalidInput(f"arguments must be a JSON object, got {_schema._kind(arguments)}")
        unknown = sorted(set(arguments) - set(self.params))
        if unknown:
            raise InvalidInput(f"unknown argument `{unknown[0]}` (expected {', '.join(self.params) or 'none'})")
        kwargs = {}
        for name, (hint, required) in self.params.items():
            if name in arguments:
                try:
                    kwargs[name] = _schema.from_json(hint, arguments[name], name)
                except _schema.ConversionError as e:
                    raise InvalidInput(f"arguments do not match the input schema: {e}") from None
            elif required:
                raise InvalidInput(f"arguments do not match the input schema: missing field `{name}`")
        if self.context_param:
            kwargs[self.context_param] = ctx
        result = self.handler(**kwargs)
        try:
            data = _schema.to_json(result)
        except _schema.ConversionError as e:
            raise Failed(f"the tool's output is not JSON: {e}") from None
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            # A lone surrogate (e.g. from `os.listdir` on a name that is not UTF-8) has no UTF-8 form.
            raise Failed(f"the tool's output is not valid Unicode: {e}") from None
        return text


@dataclass
class PluginSpec:
    """The plugin being built: metadata from `plugin()`, tools from `@tool`."""

    name: str | None = None
    version: str | None = None
    description: str = ""
    tools: dict[str, ToolSpec] = field(default_factory=dict)


REGISTRY = PluginSpec()
"""The one plugin of this component; `keel._export` serves it."""


def plugin(name: str, version: str, description: str) -> None:
    """Name the plugin: `name` is `[a-z0-9_-]+` (at most 64 characters), `version` semver."""
    if not _NAME.match(name):
        raise ValueError(f"plugin name {name!r} must match [a-z0-9_-]+ (at most 64 characters)")
    REGISTRY.name, REGISTRY.version, REGISTRY.description = name, version, description


def _strings(value: str | Iterable[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    out = list(value)
    if not all(isinstance(v, str) for v in out):
        raise TypeError(f"`{what}` takes a string or a list of strings")
    return out


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    idempotent: bool = False,
    reads: str | Iterable[str] | None = None,
    writes: str | Iterable[str] | None = None,
    connects: str | Iterable[str] | None = None,
    env: str | Iterable[str] | None = None,
) -> Any:
    """Declare a tool. Usable bare (`@tool`) or with options (`@tool(idempotent=True)`).

    - `name`: defaults to the function name with `_` turned into `-` (`word_count` -> `word-count`).
    - `description`: defaults to the docstring (without its `Args:`/`Returns:` sections).
    - `idempotent`: calling twice with the same arguments has the effect of calling once, so the
      kernel may re-run an interrupted call instead of asking a human.
    - `reads` / `writes`: directories (guest paths) the tool reads, or reads and writes.
    - `connects`: outbound HTTP hosts (`host`, `*.host`, optional `:port`).
    - `env`: environment variables, by exact name.

    Every parameter except one annotated `keel.Context` is a property of the input object; a
    parameter without a default is required. The function is returned unchanged, so it can still
    be called (and unit-tested) directly."""

    def declare(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = _build_spec(
            fn,
            name=name,
            description=description,
            idempotent=idempotent,
            capabilities=Capabilities(
                reads=_strings(reads, "reads"),
                writes=_strings(writes, "writes"),
                connects=_strings(connects, "connects"),
                env=_strings(env, "env"),
            ),
        )
        if spec.name in REGISTRY.tools:
            raise ValueError(f"two tools are named {spec.name!r}")
        REGISTRY.tools[spec.name] = spec
        return fn

    return declare(fn) if fn is not None else declare


def _build_spec(
    fn: Callable[..., Any],
    *,
    name: str | None,
    description: str | None,
    idempotent: bool,
    capabilities: Capabilities,
) -> ToolSpec:
    tool_name = name or fn.__name__.replace("_", "-")
    if not _NAME.match(tool_name):
        raise ValueError(f"tool name {tool_name!r} must match [a-z0-9_-]+ (at most 64 characters)")
    doc = _parse_docstring(fn.__doc__ or "")
    hints = typing.get_type_hints(fn, include_extras=True)
    properties: dict[str, Any] = {}
    required: list[str] = []
    params: dict[str, Any] = {}
    context_param = None
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"tool {tool_name}: parameter `{param.name}` must be a plain named parameter")
        hint = hints.get(param.name, Any)
        if hint is Context:
            context_param = param.name
            continue
        if param.name not in hints:
            raise TypeError(f"tool {tool_name}: parameter `{param.name}` needs a type annotation")
        try:
            prop = _schema.schema_of(hint)
        except _schema.SchemaError as e:
            raise TypeError(f"tool {tool_name}: parameter `{param.name}`: {e}") from None
        if param.name in doc.params and "description" not in prop:
            prop = {**prop, "description": doc.params[param.name]}
        if param.default is not param.empty:
            try:
                prop = {**prop, "default": _schema.to_json(param.default)}
            except _schema.ConversionError:
                pass
        properties[param.name] = prop
        is_required = param.default is param.empty
        if is_required:
            required.append(param.name)
        params[param.name] = (hint, is_required)
    input_schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": properties,
    }
    if required:
        input_schema["required"] = required
    input_schema["additionalProperties"] = False
    output_schema = None
    if "return" in hints and hints["return"] is not typing.Any:
        try:
            output_schema = {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                **_schema.schema_of(hints["return"]),
            }
        except _schema.SchemaError as e:
            raise TypeError(f"tool {tool_name}: return type: {e}") from None
    return ToolSpec(
        name=tool_name,
        description=description if description is not None else doc.summary,
        handler=fn,
        input_schema=input_schema,
        output_schema=output_schema,
        capabilities=capabilities,
        idempotent=idempotent,
        params=params,
        context_param=context_param,
    )


def _failure_message(error: BaseException) -> str:
    """`failed` text for an exception the tool did not raise on purpose: its type and message."""
    if isinstance(error, SystemExit):
        return f"the tool called sys.exit({error.code!r})"
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return text or type(error).__name__
