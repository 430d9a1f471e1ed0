"""Docstrings -> descriptions: the summary text, and per-parameter text from a Google-style
`Args:` (or `Attributes:`) section. Other sections (`Returns:`, `Raises:`, ...) are left out of
the description, because a model choosing a tool needs what it does, not how it reports."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

_PARAM_SECTIONS = {"args", "arguments", "parameters", "params", "attributes", "fields"}
_OTHER_SECTIONS = {"returns", "return", "raises", "yields", "examples", "example", "notes", "note"}
_ITEM = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


@dataclass
class Docstring:
    """A parsed docstring."""

    summary: str = ""
    params: dict[str, str] = field(default_factory=dict)


def parse(text: str) -> Docstring:
    """Split `text` into its description and its parameter descriptions."""
    lines = inspect.cleandoc(text).splitlines()
    summary: list[str] = []
    params: dict[str, list[str]] = {}
    section = None
    current = None
    item_indent = 0
    for line in lines:
        stripped = line.strip()
        header = stripped[:-1].lower() if stripped.endswith(":") else None
        if header in _PARAM_SECTIONS and not line.startswith(" "):
            section, current = "params", None
            continue
        if header in _OTHER_SECTIONS and not line.startswith(" "):
            section, current = "other", None
            continue
        if section is None:
            summary.append(line)
        elif section == "params":
            if not stripped:
                current = None
                continue
            indent = len(line) - len(line.lstrip())
            match = _ITEM.match(stripped)
            # A line indented deeper than the current item continues it; otherwise it is a new item.
            if match and (current is None or indent <= item_indent):
                current, item_indent = match.group(1).lstrip("*"), indent
                params[current] = [match.group(2)]
            elif current is not None:
                params[current].append(stripped)
    return Docstring(
        summary="\n".join(summary).strip(),
        params={name: " ".join(p for p in parts if p).strip() for name, parts in params.items()},
    )
