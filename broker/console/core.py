"""The console's decisions, as pure functions: what a search names, the cookie's attributes, the
CSRF check, how rows and plans are drawn. No I/O; tested in tests/test_console_core.py."""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from broker.mapping.rules import MappingRow

__all__ = [
    "COOKIE",
    "Lookup",
    "TableRow",
    "age",
    "cookie_options",
    "csrf_ok",
    "delivery_reason",
    "parse_lookup",
    "seed_table",
    "split_moves_from_form",
]

COOKIE = "broker_console"
"""The session cookie's name; it holds a random session ID, never a token."""

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")


@dataclass(frozen=True)
class Lookup:
    """What the identity search names: an internal ID, a domain's external ID, a userName or an
    email address (the last two asked of home)."""

    kind: Literal["internal", "external", "userName", "email"]
    value: str
    domain: str | None = None


def parse_lookup(text: str, domains: Iterable[str]) -> Lookup | None:
    """``DOMAIN:EXTERNAL_ID`` when the part before the first ``:`` is a known domain; an email
    address when it has the shape of one; otherwise an internal ID (tried first) or a userName.
    None for nothing to look for."""
    text = text.strip()
    if not text:
        return None
    head, sep, tail = text.partition(":")
    if sep and tail and head in set(domains):
        return Lookup("external", tail, head)
    if _EMAIL.match(text):
        return Lookup("email", text)
    return Lookup("internal", text)


def cookie_options(*, secure: bool, max_age: timedelta) -> dict[str, Any]:
    """The session cookie's attributes: not readable by scripts, never sent by another site's
    page, only over TLS when the broker's public URL is https, only to the console's path."""
    return {
        "httponly": True,
        "samesite": "Strict",
        "secure": secure,
        "path": "/console",
        "max_age": int(max_age.total_seconds()),
    }


def csrf_ok(expected: str | None, given: object) -> bool:
    """Whether a form's CSRF token is the session's (compared in constant time)."""
    if not expected or not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


@dataclass(frozen=True)
class TableRow:
    """One line of seed 002's table: Internal Entity ID, External Domain ID, External Entity ID,
    Primary flag, and the row's state."""

    internal_id: str
    domain: str
    external_id: str
    primary: bool
    state: str
    change: Literal["", "added", "removed", "changed"] = ""


def _key(row: MappingRow) -> tuple[str, str]:
    return (row.domain, row.external_id or f"(pending create of {row.internal_id})")


def seed_table(
    rows: Iterable[MappingRow], before: Iterable[MappingRow] | None = None
) -> list[TableRow]:
    """``rows`` drawn as seed 002 draws the table, in the seed's order (entity, domain); with
    ``before``, each line says whether the plan added, changed or removed it."""
    now = list(rows)
    earlier = {_key(r): r for r in before} if before is not None else None
    out = []
    for row in sorted(now, key=lambda r: (r.internal_id, r.domain, not r.primary, _key(r)[1])):
        change: Literal["", "added", "removed", "changed"] = ""
        if earlier is not None:
            old = earlier.get(_key(row))
            if old is None:
                change = "added"
            elif old != row:
                change = "changed"
        out.append(_line(row, change))
    if earlier is not None:
        kept = {_key(r) for r in now}
        out.extend(_line(r, "removed") for r in earlier.values() if _key(r) not in kept)
    return out


def _line(row: MappingRow, change: Literal["", "added", "removed", "changed"]) -> TableRow:
    return TableRow(
        row.internal_id,
        row.domain,
        row.external_id or "(pending create)",
        row.primary,
        row.state.value,
        change,
    )


def split_moves_from_form(new_id: str, picked: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """A split's moves from the form: the rows ticked (``DOMAIN:EXTERNAL_ID``) go to ``new_id``."""
    moves: list[tuple[str, str]] = []
    for value in picked:
        domain, sep, external_id = value.partition(":")
        if sep and domain and external_id:
            moves.append((domain, external_id))
    return {new_id: moves}


def delivery_reason(last_error: Mapping[str, Any] | None) -> tuple[str, str]:
    """A delivery's reason and the peer's answer (its SCIM error's detail or status), for people."""
    if not last_error:
        return ("", "")
    reason = str(last_error.get("reason") or "")
    peer = last_error.get("peer_error")
    if isinstance(peer, Mapping):
        answer = " ".join(
            str(peer[k]) for k in ("status", "scimType", "detail") if peer.get(k) is not None
        )
    elif last_error.get("status") is not None:
        answer = f"HTTP {last_error['status']}"
    else:
        answer = ""
    return (reason, answer)


def age(moment: datetime | None, now: datetime) -> str:
    """How long ago ``moment`` was, in the largest whole unit (``42 s``, ``3 min``, ``2 h``)."""
    if moment is None:
        return ""
    seconds = max(0, int((now - moment).total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"
