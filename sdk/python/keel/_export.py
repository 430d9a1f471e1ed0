"""The component side: implements the WIT `keel:plugin/tools` export over `keel.REGISTRY`.

Only importable inside a component built by componentize-py, which generates `wit_world` from
`wit/plugin.wit` (world `tool`). The entry module (`keel_entry.py`, or the one keel-build writes)
does `from keel._export import Tools`; componentize-py looks the class up by that name.
"""

from __future__ import annotations

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports import types as wit

import keel
from keel import REGISTRY, Context, Denied, Failed, InvalidInput, LogLevel, TimedOut, ToolError

_LEVELS = {
    LogLevel.TRACE: host.LogLevel.TRACE,
    LogLevel.DEBUG: host.LogLevel.DEBUG,
    LogLevel.INFO: host.LogLevel.INFO,
    LogLevel.WARN: host.LogLevel.WARN,
    LogLevel.ERROR: host.LogLevel.ERROR,
}


def log(level: LogLevel, message: str) -> None:
    """`host.log`."""
    host.log(_LEVELS[level], message)


def progress(fraction: float | None, message: str) -> None:
    """`host.progress`."""
    host.progress(fraction, message)


def _check_registry() -> None:
    if REGISTRY.name is None or REGISTRY.version is None:
        raise RuntimeError("the app never called keel.plugin(name, version, description)")
    if not REGISTRY.tools:
        raise RuntimeError("the app declares no tools (decorate a function with @keel.tool)")


def _info() -> wit.PluginInfo:
    tools = []
    for spec in REGISTRY.tools.values():
        caps = spec.capabilities
        tools.append(
            wit.ToolInfo(
                name=spec.name,
                description=spec.description,
                input_schema=json.dumps(spec.input_schema, separators=(",", ":"), ensure_ascii=False),
                output_schema=(
                    None
                    if spec.output_schema is None
                    else json.dumps(spec.output_schema, separators=(",", ":"), ensure_ascii=False)
                ),
                capabilities=wit.Capabilities(
                    filesystem=[wit.FsRequest(p, wit.FsMode.READ) for p in caps.reads]
                    + [wit.FsRequest(p, wit.FsMode.READ_WRITE) for p in caps.writes],
                    network=list(caps.connects),
                    environment=list(caps.env),
                ),
                idempotent=spec.idempotent,
            )
        )
    return wit.PluginInfo(
        name=REGISTRY.name or "",
        version=REGISTRY.version or "",
        description=REGISTRY.description,
        tools=tools,
    )


# Computed while componentize-py pre-initialises the component (at build time): a missing
# `keel.plugin(...)` or a bad declaration fails the build, and `describe` costs nothing at run time.
_check_registry()
_INFO = _info()


def _wit_error(error: ToolError) -> wit.ToolError:
    if isinstance(error, InvalidInput):
        return wit.ToolError_InvalidInput(error.message)
    if isinstance(error, Denied):
        return wit.ToolError_Denied(wit.DeniedAccess(error.capability, error.target, error.message))
    if isinstance(error, TimedOut):
        return wit.ToolError_TimedOut(error.message)
    if isinstance(error, Failed):
        return wit.ToolError_Failed(error.message)
    return wit.ToolError_Failed(error.message)


class Tools(exports.Tools):
    """The `keel:plugin/tools` export."""

    def describe(self) -> wit.PluginInfo:
        return _INFO

    def call(self, ctx: wit.CallContext, tool: str, arguments: str) -> wit.ToolOutput:
        spec = REGISTRY.tools.get(tool)
        if spec is None:
            raise Err(wit.ToolError_UnknownTool(tool))
        context = Context(
            call_id=ctx.call_id,
            job_id=ctx.job_id,
            scope=ctx.scope,
            principal=ctx.principal,
            trace_id=ctx.trace_id,
            deadline_ms=ctx.deadline_ms,
        )
        try:
            return wit.ToolOutput(spec.invoke(context, arguments))
        except ToolError as e:
            raise Err(_wit_error(e)) from None
        # BaseException: KeyboardInterrupt, SystemExit (`sys.exit`) and the like are the tool
        # failing too; escaping this function they would crash the component instead.
        except BaseException as e:  # noqa: BLE001 - every other exception is the tool failing
            # The traceback goes to the host log (for the developer); the error says what failed.
            log(LogLevel.ERROR, "".join(_format_traceback(e))[-4000:])
            raise Err(wit.ToolError_Failed(keel._failure_message(e))) from None


def _format_traceback(error: BaseException) -> list[str]:
    import traceback

    return traceback.format_exception(type(error), error, error.__traceback__)
