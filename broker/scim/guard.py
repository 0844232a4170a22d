"""The leak guard (DESIGN section 3): the last check on every domain-bound response. Pure.

It is not the mechanism: the rewriter is. Tests show the rewriter never needs it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

__all__ = ["IdShape", "Leak", "find_leak", "scrub"]

_WORD = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-")


class IdShape:
    """The shape of the home's IDs (a regular expression), matched only as a whole token: a
    32-hex run inside a longer hash is not an ID. Boundaries are checked by hand, since a
    look-behind makes the scan of a large response twice as slow."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def find(self, text: str) -> list[str]:
        found = []
        for match in self.pattern.finditer(text):
            start, end = match.span()
            if (start == 0 or text[start - 1] not in _WORD) and (
                end == len(text) or text[end] not in _WORD
            ):
                found.append(match.group(0))
        return found

    def fullmatch(self, text: str) -> bool:
        return self.pattern.fullmatch(text) is not None


@dataclass(frozen=True)
class Leak:
    """Where a leak was found; never the leaked value itself."""

    where: str
    reason: str


def find_leak(
    parts: Iterable[tuple[str, str]],
    *,
    internal_ids: Collection[str],
    id_pattern: IdShape,
    allowed: Collection[str],
) -> Leak | None:
    """The first leak in ``parts`` ((where, text) pairs: body, headers), or None.

    A leak is any internal ID in play, or any string in the home's ID shape that is not one of
    ``allowed`` (the caller's own IDs and values).
    """
    # IDs in the home's shape are all caught by the one pattern scan; only the others need a
    # search of their own.
    odd = [i for i in internal_ids if i and i not in allowed and not id_pattern.fullmatch(i)]
    for where, text in parts:
        for match in id_pattern.find(text):
            if match not in allowed:
                return Leak(where, "a string in the home's ID shape that is not the caller's")
        for internal in odd:
            if internal in text:
                return Leak(where, "an internal ID in play")
    return None


def _literal(value: str) -> Callable[[re.Match[str]], str]:
    return lambda _match: value


def scrub(text: str, replacements: dict[str, str], id_pattern: IdShape) -> str:
    """Free text with known IDs replaced by the caller's, and anything else ID-shaped masked.

    Known IDs are matched without regard to case: an upper-cased internal ID is still one.
    """
    for old, new in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
        if old:
            # A replacement function, so that backslashes in ``new`` are taken literally.
            text = re.compile(re.escape(old), re.IGNORECASE).sub(_literal(new), text)
    allowed = set(replacements.values())
    for found in set(id_pattern.find(text)) - allowed:
        text = text.replace(found, "[id]")
    return text
