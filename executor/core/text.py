"""Text that came from somewhere hostile (a guest's console, a job's variables) made printable."""

from __future__ import annotations

import re

# C0 controls and DEL: a terminal takes them as commands (cursor moves, title changes, ...).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str, replacement: str = "", keep: str = "") -> str:
    """`text` with every control character (newlines and tabs too, unless in `keep`) replaced."""
    return _CONTROL.sub(lambda m: m.group() if m.group() in keep else replacement, text)


def printable_lines(text: str) -> str:
    """Each line of `text` made printable, the line breaks and tabs kept."""
    return "\n".join(printable(line, keep="\t") for line in text.splitlines())
