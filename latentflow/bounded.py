"""Bounded parsing of what a user or a download hands us: YAML and JSON with limits on size,
nesting depth and YAML aliases, checked before anything is built from them.

A 300-byte YAML "alias bomb" expands into gigabytes, and a 100 000-deep JSON list overflows
the interpreter's stack; latentflow's own files (configs, ``state.json``, an export's
``model_index.json`` and ``latentflow.json``) are a few kilobytes and a few levels deep. So
files larger than ``MAX_BYTES``, deeper than ``MAX_DEPTH`` or with more than ``MAX_ALIASES``
YAML aliases are refused with one ``BoundsError`` line, in well under a second and a few
megabytes of memory, whatever they hold.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from .errors import LatentflowError

__all__ = [
    "MAX_ALIASES",
    "MAX_BYTES",
    "MAX_DEPTH",
    "BoundsError",
    "json_depth",
    "physical_memory",
    "read_json",
    "read_yaml",
]

MAX_BYTES = 1 << 20  # 1 MiB
MAX_DEPTH = 32
MAX_ALIASES = 16


class BoundsError(LatentflowError):
    """A file or value too large, too deep or with too many aliases to be one of ours."""


def physical_memory() -> Optional[int]:
    """This machine's memory in bytes, the bound that data sizes are checked against before
    anything is allocated; None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _text(source, what: str, max_bytes: int) -> str:
    if isinstance(source, str):
        data = source.encode()
    else:
        path = Path(source)
        size = path.stat().st_size
        if size > max_bytes:
            raise BoundsError(
                f"{what} {path} is {size} bytes, more than the {max_bytes} a latentflow file can be; "
                "it is not one (or it is damaged)"
            )
        data = path.read_bytes()
    if len(data) > max_bytes:
        raise BoundsError(f"{what} is {len(data)} bytes, more than {max_bytes}")
    return data.decode("utf-8")


_STRUCTURE = re.compile(r"[\[\]{}\"'\\]")  # the only characters that open, close or quote


def json_depth(text: str, quotes: str = '"', limit: Optional[int] = None) -> int:
    """The deepest nesting of brackets in ``text``, outside strings (one linear scan over the
    brackets and quotes alone); YAML's flow style nests the same way, with ``quotes`` = ``"'``.
    With ``limit``, the scan ends as soon as the nesting passes it (a bomb costs nothing)."""
    depth = deepest = 0
    in_string, escaped_at = "", -1
    for m in _STRUCTURE.finditer(text):
        i, ch = m.start(), m.group()
        if i == escaped_at:
            continue
        if in_string:
            if ch == "\\" and in_string == '"':
                escaped_at = i + 1
            elif ch == in_string:
                in_string = ""
        elif ch in quotes:
            in_string = ch
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if limit is not None and deepest > limit:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def _indent_depth(text: str) -> int:
    """How many block levels YAML ``text`` opens: a stack of indentations, one pass over lines."""
    stack, deepest = [], 0
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        while stack and stack[-1] >= indent:
            stack.pop()
        stack.append(indent)
        deepest = max(deepest, len(stack) + stripped.startswith("- "))
    return deepest


def read_json(source, what: str = "JSON file", max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse a JSON file (a path) or text within the bounds; ``ValueError`` for bad JSON as
    ``json.loads`` raises it, ``BoundsError`` past the bounds."""
    text = _text(source, what, max_bytes)
    if json_depth(text, limit=max_depth) > max_depth:
        where = source if not isinstance(source, str) else "text"
        raise BoundsError(
            f"{what} {where} is nested more than the {max_depth} levels a latentflow file has; it is not one "
            "(or it is damaged)"
        )
    return json.loads(text)


def _bounded_loader(max_depth: int, max_aliases: int):
    import yaml

    class Loader(yaml.SafeLoader):
        """PyYAML's safe loader, refusing deep nesting and many aliases while composing."""

        def __init__(self, stream):
            super().__init__(stream)
            self._depth = 0
            self._aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > max_aliases:
                    raise BoundsError(f"it uses more than {max_aliases} YAML aliases (*name); expand them")
            self._depth += 1
            if self._depth > max_depth:
                raise BoundsError(f"it is nested more than {max_depth} levels deep")
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    return Loader


def read_yaml(
    source,
    what: str = "YAML file",
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    max_aliases: int = MAX_ALIASES,
) -> Any:
    """Parse YAML (a path, or text) with the safe loader, within the bounds; raises
    ``yaml.YAMLError`` for bad YAML and ``BoundsError`` past the bounds."""
    import yaml

    text = _text(source, what, max_bytes)
    where = f" {source}" if not isinstance(source, str) else ""
    depth = max(json_depth(text, "\"'", limit=max_depth), _indent_depth(text))  # before PyYAML's scanner
    if depth > max_depth:
        raise BoundsError(
            f"{what}{where}: it is nested more than {max_depth} levels deep; a latentflow file is a few "
            "plain levels deep"
        )
    try:
        return yaml.load(text, Loader=_bounded_loader(max_depth, max_aliases))
    except BoundsError as exc:
        raise BoundsError(f"{what}{where}: {exc}; a latentflow file is a few plain levels deep") from None
    except ValueError as exc:  # a number past Python's int-string limit (4300 digits)
        if "integer string conversion" not in str(exc):
            raise
        raise BoundsError(f"{what}{where}: it holds a number of thousands of digits; no setting needs one") from None
