"""textkit-python: the shared example tool set (`word-count`, `read-file`), in Python.

Every language's textkit gives byte-identical outputs for identical calls; the rules are in
`host/cli/tests/languages.rs`, which checks them.
"""

import os
import re
from dataclasses import dataclass

import keel

keel.plugin("textkit-python", "0.1.0", "Text utilities: count words, read text files under /data.")

# ASCII whitespace only (space, \t, \n, \r, \x0b, \x0c): Python's str.split() would also split on
# Unicode spaces, and the other languages do not.
_WORD = re.compile(r"[^ \t\n\r\x0b\x0c]+")

DATA = "/data"


@dataclass
class Counts:
    """Counts of one text."""

    chars: int
    lines: int
    words: int


@dataclass
class FileText:
    """One text file."""

    bytes: int
    path: str
    text: str


@keel.tool(name="word-count", idempotent=True)
def word_count(text: str) -> Counts:
    """Count the characters (Unicode scalar values), lines and words of a text.

    Args:
        text: The text to count.
    """
    if not isinstance(text, str):  # the SDK checked already; never trust the caller
        raise keel.InvalidInput("`text` must be a string")
    lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    return Counts(chars=len(text), lines=lines, words=len(_WORD.findall(text)))


@keel.tool(name="read-file", idempotent=True, reads=DATA)
def read_file(path: str) -> FileText:
    """Read a UTF-8 text file under /data.

    Args:
        path: Absolute path of the file, under /data/.
    """
    if not path.startswith("/") or ".." in path.split("/") or not path.startswith(DATA + "/"):
        raise keel.Denied("filesystem", path, f"`{path}` is not a path under {DATA}/")

    if not os.path.isdir(DATA):
        raise keel.Denied("filesystem", path, f"{DATA} is not granted to this plugin")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise keel.Failed(f"cannot read `{path}`: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise keel.Failed(f"`{path}` is not UTF-8 text") from None
    return FileText(bytes=len(data), path=path, text=text)
