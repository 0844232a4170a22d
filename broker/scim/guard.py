"""The leak guard (DESIGN section 3): the last check on every domain-bound response. Pure.

It is not the mechanism: the rewriter is. Tests show the rewriter never needs it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

__all__ = ["Leak", "find_leak", "scrub"]


@dataclass(frozen=True)
class Leak:
    """Where a leak was found; never the leaked value itself."""

    where: str
    reason: str


def find_leak(
    parts: Iterable[tuple[str, str]],
    *,
    internal_ids: Collection[str],
    id_pattern: re.Pattern[str],
    allowed: Collection[str],
) -> Leak | None:
    """The first leak in ``parts`` ((where, text) pairs: body, headers), or None.

    A leak is any internal ID in play, or any string in the home's ID shape that is not one of
    ``allowed`` (the caller's own IDs and values).
    """
    for where, text in parts:
        for internal in internal_ids:
            if internal and internal not in allowed and internal in text:
                return Leak(where, "an internal ID in play")
        for match in id_pattern.finditer(text):
            if match.group(0) not in allowed:
                return Leak(where, "a string in the home's ID shape that is not the caller's")
    return None


def scrub(text: str, replacements: dict[str, str], id_pattern: re.Pattern[str]) -> str:
    """Free text with known IDs replaced by the caller's, and anything else ID-shaped masked."""
    for old, new in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(old, new)
    allowed = set(replacements.values())
    return id_pattern.sub(lambda m: m.group(0) if m.group(0) in allowed else "[id]", text)
