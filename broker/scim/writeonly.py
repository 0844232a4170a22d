"""Write-only attributes (RFC 7643 ``returned: never``, such as ``password``): what a write sets.

Home never returns them, so the broker takes them from the write itself to deliver them to push
peers (RFC 7642 section 2.3.6). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["DEFAULT_WRITE_ONLY", "write_only_values"]

DEFAULT_WRITE_ONLY = frozenset({"password"})
"""What RFC 7643 returns "never", for a home whose ``/Schemas`` cannot be read."""

_CORE_PREFIX = "urn:ietf:params:scim:schemas:core:2.0:"


def write_only_values(method: str, body: Any, names: Iterable[str]) -> dict[str, Any]:
    """The write-only attributes (``names``, as home's /Schemas spells them) a write sets: from a
    POST or PUT body, or from PATCH ``add``/``replace`` operations, with or without a path. Pure."""
    canonical = {n.lower(): n for n in names}

    def pick(values: Mapping[str, Any]) -> dict[str, Any]:
        found = {}
        for key, value in values.items():
            name = canonical.get(_unqualified(key))
            if name is not None and value is not None:
                found[name] = value
        return found

    if not isinstance(body, Mapping):
        return {}
    if method in ("POST", "PUT"):
        return pick(body)
    if method != "PATCH":
        return {}
    found: dict[str, Any] = {}
    for op in body.get("Operations") or []:
        if not isinstance(op, Mapping) or str(op.get("op", "")).lower() not in ("add", "replace"):
            continue
        path, value = op.get("path"), op.get("value")
        if isinstance(path, str) and path:
            found |= pick({path: value})
        elif isinstance(value, Mapping):
            found |= pick(value)
    return found


def _unqualified(key: str) -> str:
    lowered = key.lower()
    if lowered.startswith(_CORE_PREFIX):
        return lowered.rsplit(":", 1)[-1]
    return lowered
