"""Drive Keel's MCP server with the official MCP Python SDK (PyPI `mcp`, pinned by
scripts/setup/mcp.sh) and check what a real client sees.

    python3 keel_client.py stdio --keel KEEL --home HOME --install TEXTKIT.wasm
    python3 keel_client.py http  --keel KEEL --home HOME --url http://127.0.0.1:PORT/mcp

The home has `hello` installed and a policy that denies `textkit-rust/read-file` and asks for
approval of `textkit-rust/word-count`. Each step prints one JSON line (`{"step": ..., ...}`) that
the Rust driver (host/cli/tests/mcp_clients.rs) checks too; any failed expectation exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import anyio
import mcp_types as types
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

STEP_TIMEOUT = 120


def report(step: str, **fields) -> None:
    print(json.dumps({"step": step, **fields}), flush=True)


def check(ok: bool, what: str) -> None:
    if not ok:
        report("failed", what=what)
        raise SystemExit(1)


def keel(args: argparse.Namespace, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KEEL_HOME=args.home)
    env.pop("KEEL_LOG", None)
    return subprocess.run([args.keel, *argv], env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)


class Watch:
    """What the server told this client outside responses: log messages and list changes."""

    def __init__(self) -> None:
        self.logs: list[dict] = []
        self.list_changed = anyio.Event()
        self.new_log = anyio.Event()

    async def on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params.data if isinstance(params.data, dict) else {"message": params.data})
        self.new_log.set()

    async def on_message(self, message) -> None:
        message = getattr(message, "root", message)
        if isinstance(message, types.ToolListChangedNotification):
            self.list_changed.set()

    async def action_id(self) -> str:
        with anyio.fail_after(STEP_TIMEOUT):
            while True:
                for log in self.logs:
                    if log.get("action_id"):
                        return log["action_id"]
                self.new_log = anyio.Event()
                await self.new_log.wait()


def structured(result: types.CallToolResult) -> dict:
    return result.structured_content or {}


async def list_and_greet(session: ClientSession) -> None:
    tools = {t.name: t for t in (await session.list_tools()).tools}
    check("hello__greet" in tools, f"hello__greet listed: {sorted(tools)}")
    greet = tools["hello__greet"]
    check(greet.input_schema.get("properties", {}).get("name", {}).get("type") == "string", "greet's schema")
    check(greet.annotations is not None and greet.annotations.idempotent_hint is True, "idempotentHint")
    report("listed", tools=sorted(tools))
    result = await session.call_tool("hello__greet", {"name": "Ada"})
    check(not result.is_error, f"greet succeeded: {result}")
    check(structured(result) == {"greeting": "Hello, Ada!"}, f"greet output: {result}")
    report("called", output=structured(result))
    bad = await session.call_tool("hello__greet", {"name": 5})
    check(bad.is_error is True, "schema refusal is an isError result")
    check(structured(bad)["error"]["kind"] == "invalid_input", f"invalid_input: {bad}")
    report("invalid_input", error=structured(bad)["error"])


async def denied(session: ClientSession) -> None:
    result = await session.call_tool("textkit-rust__read-file", {"path": "/data/secret.txt"})
    check(result.is_error is True, f"policy denial is an isError result: {result}")
    error = structured(result)["error"]
    check(error["kind"] == "policy_denied", f"policy_denied: {error}")
    check(bool(structured(result).get("job_id")), "the refused call has a job")
    report("denied", error=error, job_id=structured(result)["job_id"])


async def approve_from_another_process(args, session: ClientSession, watch: Watch) -> None:
    """The call stays open, the server says how to approve, `keel actions approve` answers."""
    outcome: dict = {}

    async def call() -> None:
        outcome["result"] = await session.call_tool("textkit-rust__word-count", {"text": "one two three"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        action = await watch.action_id()
        how = next(log for log in watch.logs if log.get("action_id") == action)["how"]
        check(how == f"keel actions approve {action}", f"the notice says how to approve: {how}")
        done = keel(args, "actions", "approve", action)
        check(done.returncode == 0, f"keel actions approve: {done.stderr}")
    result = outcome["result"]
    check(not result.is_error, f"approved call succeeded: {result}")
    check(structured(result).get("words") == 3, f"word count: {result}")
    report("approved_by_cli", action_id=action, output=structured(result))


async def approval_pending_then_cli(args, session: ClientSession) -> None:
    """The wait runs out: `approval_pending` with the action; the job finishes once approved."""
    result = await session.call_tool("textkit-rust__word-count", {"text": "a b"})
    check(result.is_error is True, f"pending is an isError result: {result}")
    error = structured(result)["error"]
    check(error["kind"] == "approval_pending", f"approval_pending: {error}")
    action, job = error["action_id"], error["job_id"]
    check(error["how"] == f"keel actions approve {action}", f"how: {error}")
    done = keel(args, "actions", "approve", action)
    check(done.returncode == 0, f"keel actions approve: {done.stderr}")
    with anyio.fail_after(STEP_TIMEOUT):
        while True:
            shown = keel(args, "jobs", "show", job, "--json")
            state = json.loads(shown.stdout)["job"]["state"] if shown.returncode == 0 else "?"
            if state == "SUCCEEDED":
                break
            check(state in ("RUNNING", "WAITING_ACTION", "QUEUED"), f"job state {state}")
            await anyio.sleep(0.2)
    report("pending_then_approved", action_id=action, job_id=job)


async def by_elicitation(connect, answer: str) -> None:
    """A client that supports elicitation is asked, and its answer decides."""
    asked: list[str] = []

    async def elicit(context, params) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"decision": answer})

    async with connect() as (read, write):
        async with ClientSession(read, write, elicitation_callback=elicit) as session:
            await session.initialize()
            result = await session.call_tool("textkit-rust__word-count", {"text": "x y z w"})
    check(len(asked) == 1 and "textkit-rust/word-count" in asked[0], f"asked once: {asked}")
    if answer == "approve":
        check(not result.is_error and structured(result).get("words") == 4, f"approved: {result}")
    else:
        check(result.is_error is True, f"denied: {result}")
        check(structured(result)["error"]["kind"] == "approval_denied", f"approval_denied: {result}")
    report(f"elicitation_{answer}", output=structured(result))


async def stdio(args) -> None:
    params = StdioServerParameters(
        command=args.keel,
        args=["mcp"],
        env={"KEEL_HOME": args.home, "PATH": os.environ.get("PATH", "")},
    )
    watch = Watch()
    async with stdio_client(params) as (read, write):
        async with ClientSession(
            read, write, logging_callback=watch.on_log, message_handler=watch.on_message
        ) as session:
            init = await session.initialize()
            check(init.server_info.name == "keel", f"server name: {init.server_info}")
            await list_and_greet(session)
            tools = {t.name for t in (await session.list_tools()).tools}
            check("textkit-rust__word-count" not in tools, "textkit not installed yet")
            # Installed while connected: the server tells the client the list changed.
            done = keel(args, "install", args.install)
            check(done.returncode == 0, f"keel install: {done.stderr}")
            with anyio.fail_after(STEP_TIMEOUT):
                await watch.list_changed.wait()
            tools = {t.name for t in (await session.list_tools()).tools}
            check("textkit-rust__word-count" in tools, f"textkit listed after install: {tools}")
            report("list_changed", tools=sorted(tools))
            await denied(session)
            await approve_from_another_process(args, session, watch)
    await by_elicitation(lambda: stdio_client(params), "approve")
    await by_elicitation(lambda: stdio_client(params), "deny")


def http_client(args):
    """The Streamable HTTP transport, with the API key (`keel serve`) when one is given."""
    if not args.bearer:
        return streamable_http_client(args.url)
    from mcp.shared._httpx_utils import create_mcp_http_client

    client = create_mcp_http_client(headers={"Authorization": f"Bearer {args.bearer}"})
    return streamable_http_client(args.url, http_client=client)


async def http(args) -> None:
    async with http_client(args) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            check(init.server_info.name == "keel", f"server name: {init.server_info}")
            await list_and_greet(session)
            await denied(session)
            await approval_pending_then_cli(args, session)
    await by_elicitation(lambda: http_client(args), "approve")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--keel", required=True)
    parser.add_argument("--home", required=True)
    parser.add_argument("--install", help="component to install while connected (stdio)")
    parser.add_argument("--url", help="Streamable HTTP endpoint (http)")
    parser.add_argument("--bearer", help="API key sent as `Authorization: Bearer` (http, keel serve)")
    args = parser.parse_args()
    run = stdio if args.transport == "stdio" else http
    anyio.run(run, args)
    report("done")


if __name__ == "__main__":
    sys.exit(main())
