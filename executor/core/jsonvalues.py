"""Reading JSON documents someone else wrote (the job payload, an image manifest) defensively."""

from __future__ import annotations

from typing import Any


def object_at(document: Any, key: str) -> dict[str, Any]:
    """`document[key]` if `document` is an object and that member is one too, else {}."""
    value = document.get(key) if isinstance(document, dict) else None
    return value if isinstance(value, dict) else {}
