"""python-exec: run untrusted Python code in a fresh CPython inside the Keel sandbox.

One tool, `run`: {code, stdin?, files?} -> {stdout, stderr, value?, error?, files, truncated}.
The code runs as a script in `/scratch` (the only capability requested, read-write), with the input
files written there first and every file left there returned. Like a REPL, when the code ends with
an expression, `value` is its repr.

Isolation comes from the host, not from this file: every call is a fresh component instance (no
Python state survives a call) unless the call names a `session_id` (then the host keeps this
instance, and its scratch directory, for the next call of that session of the same caller), the
sandbox has no network, no environment and no filesystem beyond its scratch directory (a fresh
private one per call or session unless a directory was granted at `/scratch`), and its memory and
time are bounded by the plugin's limits.
What this file adds is hygiene: the scratch directory is emptied before (and after) each run, so
files never leak from one run into the next, and captured output is bounded so that a flood of
prints becomes a truncated result instead of an oversized one.
"""

from __future__ import annotations

import ast
import builtins
import io
import os
import random
import shutil
import sys
import traceback
from dataclasses import dataclass, field

# Imported here, while componentize-py pre-initialises the component, so that code importing them
# pays nothing at run time: the snapshot already holds them. (Other stdlib modules import normally.)
import collections  # noqa: F401
import datetime  # noqa: F401
import decimal  # noqa: F401
import fractions  # noqa: F401
import functools  # noqa: F401
import itertools  # noqa: F401
import json  # noqa: F401
import math  # noqa: F401
import re  # noqa: F401
import statistics  # noqa: F401
import string  # noqa: F401
import textwrap  # noqa: F401

import keel

keel.plugin(
    "python-exec",
    "0.1.0",
    "Runs Python code (CPython 3, standard library only) in a sandbox with no network and a scratch directory.",
)

SCRATCH = "/scratch"
# Bounds on what one run returns; together well under the host's 1 MiB default output limit.
MAX_STDOUT = 256 * 1024
MAX_STDERR = 64 * 1024
MAX_VALUE = 64 * 1024
MAX_FILES_BYTES = 512 * 1024
MAX_FILES = 100

# The globals of a session's code, kept from run to run. The host keeps this instance alive only
# for the calls of one session (scope, principal and session id), so one namespace is enough.
_session_namespace: dict | None = None


# Whether the running code did something that can put a file in /scratch. A run that did not
# returns no files without reading the directory (a host call of ~0.25 ms). Set by the audit hook
# below on every event that opens, creates, renames or links a path, and on every other `os.`,
# `shutil.`, `tempfile.`, `sqlite3.` and `dbm` event (a superset: a false alarm only costs the
# directory read); reset right before the code runs, after this file's own directory work.
_touched_files = True

_FILE_EVENTS = ("open", "os.", "shutil.", "tempfile.", "sqlite3.", "dbm", "_io")


def _audit(event: str, args: tuple) -> None:
    global _touched_files
    if event.startswith(_FILE_EVENTS):
        _touched_files = True


sys.addaudithook(_audit)


class CappedText(io.TextIOBase):
    """A text stream that keeps the first `limit` characters and counts the rest."""

    def __init__(self, limit: int, echo=None) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.dropped = 0
        # With `echo`, every write also goes to this stream (the component's own stdout/stderr,
        # which the host may stream to a terminal as it is written); dropped at its first error.
        self.echo = echo

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self.limit - self.size
        kept = s[: max(room, 0)]
        if kept:
            self.parts.append(kept)
            self.size += len(kept)
        # The echo shows what is kept, and says once where it stops: the cap bounds what the
        # code prints to a terminal too.
        self._echo(kept)
        if len(kept) < len(s):
            if not self.dropped:
                self._echo(f"\n[... output past {self.limit} characters not shown]\n")
            self.dropped += len(s) - len(kept)
        return len(s)

    def _echo(self, s: str) -> None:
        if self.echo is None or not s:
            return
        try:
            self.echo.write(s)
            self.echo.flush()
        except (OSError, ValueError):
            self.echo = None

    def text(self) -> str:
        out = "".join(self.parts)
        if self.dropped:
            out += f"\n[... {self.dropped} more characters not shown]"
        return out


@dataclass
class RunResult:
    """What one run produced."""

    stdout: str
    stderr: str
    files: dict[str, str]
    truncated: bool
    value: str | None = None
    error: str | None = None
    # The code's exit status, as a `python3` process would report it: 0, `sys.exit(n)`'s n, 1 for
    # an uncaught exception.
    exit_code: int = 0
    omitted_files: list[str] = field(default_factory=list)


def _clear(directory: str) -> bool:
    """Remove everything inside `directory` (not the directory itself); links are removed, not
    followed. Returns whether `directory` exists.

    One directory read tells both (the host usually gives a fresh empty directory): every
    filesystem operation is a host call costing ~0.1 ms, a large part of a `print(1)` run."""
    try:
        entries = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return False
    with entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass
    return True


def _check_name(name: str) -> str:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in name:
        raise keel.InvalidInput(f"file name {name!r} must be a relative path without `.`, `..` or empty parts")
    return name


def _collect(directory: str) -> tuple[dict[str, str], list[str], bool]:
    """UTF-8 files under `directory` (relative names), names of the files left out, and whether
    the size bound left any out."""
    files: dict[str, str] = {}
    omitted: list[str] = []
    # Most runs write no file: one directory read instead of a walk.
    with os.scandir(directory) as entries:
        if next(entries, None) is None:
            return files, omitted, False
    total = 0
    truncated = False
    for top, dirs, names in os.walk(directory, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(top, name)
            rel = os.path.relpath(path, directory)
            if os.path.islink(path) or not os.path.isfile(path):
                omitted.append(rel)
                continue
            if len(files) >= MAX_FILES or total + os.path.getsize(path) > MAX_FILES_BYTES:
                omitted.append(rel)
                truncated = True
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read(MAX_FILES_BYTES + 1)
                files[rel] = data.decode("utf-8")
                total += len(data)
            except (OSError, UnicodeDecodeError):
                omitted.append(rel)
    return files, omitted, truncated


def _single_expression(code: str, filename: str):
    """`code` compiled as one expression when it is a one-line expression (`print(1)`), else None.

    The general path parses to an AST (Python objects for every node) and compiles twice (the
    statements, then the final expression): ~0.3 ms of a `print(1)` run. A one-line expression
    needs one compile. Other code fails this compile early, at its first statement, and takes the
    general path; code with a backslash never tries it, so that a string's invalid-escape warning
    is not shown twice (once by each parse)."""
    if "\n" in code.rstrip() or "\\" in code:
        return None
    try:
        return compile(code, filename, "eval")
    except SyntaxError:
        return None


def _execute(
    code: str, stdin: str, out: CappedText, err: CappedText, namespace: dict | None = None
) -> tuple[str | None, str | None, int]:
    """Run `code` with captured streams; returns (repr of the final expression, error summary,
    exit status).
    `namespace`, when given, is a session's globals: kept (not cleared) after the run."""
    filename = "<code>"
    # Register the source so tracebacks can show the offending lines.
    import linecache

    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    keep = namespace is not None
    if namespace is None:
        namespace = {"__name__": "__main__", "__builtins__": builtins}
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin), out, err
    value = None
    error = None
    status = 0
    try:
        last = _single_expression(code, filename)
        if last is None:
            tree = ast.parse(code, filename, "exec")
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = compile(ast.Expression(tree.body.pop().value), filename, "eval")
            exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            result = eval(last, namespace)
            if result is not None:
                value = repr(result)
                if len(value) > MAX_VALUE:
                    value = value[:MAX_VALUE] + f"... [{len(value) - MAX_VALUE} more characters]"
    except SystemExit as e:
        if e.code not in (None, 0):
            error = f"SystemExit: {e.code}"
            if isinstance(e.code, int):
                status = e.code
            else:
                # As CPython does: a non-integer code is printed and the status is 1.
                err.write(f"{e.code}\n")
                status = 1
    except BaseException as e:  # noqa: BLE001 - the user's code may raise anything
        status = 1
        # Free what the code built (a memory bomb's data) before formatting needs memory; a
        # session keeps its globals, so only a one-off run can do this.
        if not keep:
            namespace.clear()
        # The summary is the exception line (for a SyntaxError, without the source excerpt).
        error = traceback.format_exception_only(type(e), e)[-1].strip()
        try:
            if isinstance(e, SyntaxError):
                # Where the parser stopped; the frames would only show ast.parse.
                err.write("".join(traceback.format_exception_only(type(e), e)))
            else:
                tb = e.__traceback__
                # Drop this function's own frame: the user sees only their code.
                while tb is not None and tb.tb_frame.f_code is _execute.__code__:
                    tb = tb.tb_next
                traceback.print_exception(type(e), e, tb, file=err)
        except MemoryError:
            err.write(error + "\n")
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
        if not keep:
            namespace.clear()
    return value, error, status


@keel.tool(idempotent=True, writes=SCRATCH)
def run(
    code: str,
    ctx: keel.Context,
    stdin: str = "",
    files: dict[str, str] | None = None,
    session_id: str | None = None,
    echo: bool = False,
) -> RunResult:
    """Run Python code (CPython 3, standard library only) and return what it printed.

    The code runs as a script with `/scratch` as its working directory, holding the given files;
    every file left there is returned. No network, no subprocesses, no state kept between runs
    unless they name the same `session_id`. When the code ends with an expression, `value` is its
    repr, as in a REPL.

    Args:
        code: Python source to run.
        stdin: Text the code reads from standard input.
        files: Files to create in the working directory first, by relative name.
        session_id: Keep globals and files for the next run with the same id (idle sessions expire).
        echo: Also write the output to this component's own stdout/stderr as it is printed
            (`keel exec --lang` streams them to the terminal).
    """
    global _session_namespace, _touched_files
    files = files or {}
    for name in files:
        _check_name(name)
    in_session = session_id is not None
    # A session keeps its files; a one-off run starts from an empty directory.
    have_scratch = os.path.isdir(SCRATCH) if in_session else _clear(SCRATCH)
    if files and not have_scratch:
        raise keel.Denied("filesystem", SCRATCH, f"{SCRATCH} is not granted, so input files cannot be written")
    # The build-time snapshot fixed the PRNG state; reseed from the host's randomness per run.
    # 128 bits are plenty for a non-cryptographic generator (`secrets` and `os.urandom` ask the
    # host every time) and cost less than `random.seed()`'s 2.5 KB.
    random.seed(int.from_bytes(os.urandom(16)))
    if session_id is not None and _session_namespace is None:
        _session_namespace = {"__name__": "__main__", "__builtins__": builtins}
    if have_scratch:
        for name, content in files.items():
            path = os.path.join(SCRATCH, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(content)
        os.chdir(SCRATCH)
    out = CappedText(MAX_STDOUT, sys.__stdout__ if echo else None)
    err = CappedText(MAX_STDERR, sys.__stderr__ if echo else None)
    # Input files (written above) count as touched; a session's earlier files too.
    _touched_files = bool(files) or in_session
    value, error, status = _execute(code, stdin, out, err, _session_namespace if in_session else None)
    if error is not None:
        # Only a failed run is worth a log line (a host call, and a row in a job's log); its
        # result says the same.
        ctx.log(keel.LogLevel.DEBUG, f"ran {len(code)} characters of code: {error}")
    if have_scratch and _touched_files:
        produced, omitted, files_truncated = _collect(SCRATCH)
    else:
        produced, omitted, files_truncated = {}, [], False
    # What the code wrote stays until the host removes the call's scratch directory: the host
    # measures it against the scratch cap after the call (a run emptying it here escaped the cap).
    return RunResult(
        stdout=out.text(),
        stderr=err.text(),
        files=produced,
        truncated=bool(out.dropped or err.dropped or files_truncated),
        value=value,
        error=error,
        exit_code=status,
        omitted_files=omitted,
    )


class _BuildContext(keel.Context):
    """The context of the build-time warm-up: nothing reaches the host (there is none yet)."""

    def log(self, level: keel.LogLevel, message: str) -> None:
        pass


def _warm_up() -> None:
    """Run the per-call path once while componentize-py pre-initialises the component.

    componentize-py runs this module's top level at build time and snapshots the interpreter's
    memory; every run then starts from that snapshot. Running a trivial program through the same
    path a call takes (argument parsing, the handler, `ast` parse/compile/exec/eval, the capture
    streams, the result's JSON) makes CPython build its lazy state (type and method caches,
    interned names, the code objects' specialised forms, imports done on first use) now, once,
    instead of in every fresh instance: a run writes fewer pages of the snapshot, and each first
    write to a page is a copy-on-write fault.

    Nothing of it is visible to a run: it uses the SDK's own entry with code that defines no
    globals, it touches no directory (`/scratch` does not exist at build time), the capture streams
    are per call, and the source it registered for tracebacks and its namespace are gone before the
    snapshot is taken (`the_build_time_warm_up_is_invisible_to_runs` in
    host/cli/tests/python_exec.rs checks what a run sees).
    """
    spec = keel.REGISTRY.tools["run"]
    ctx = _BuildContext()
    # A final expression (the `value` path) and a print (stdout), then an exception's traceback
    # (stderr and the `error` path), as user code would produce them.
    for code in ("print(1)\n1 + 1", "1 / 0"):
        spec.invoke(ctx, json.dumps({"code": code}))
    # (`linecache` is imported already, by `traceback`; importing `gc` here would add a module.)
    import linecache

    linecache.cache.pop("<code>", None)


_warm_up()
