"""What a bulk response says was written: pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from broker.scim.rewrite import Endpoints

__all__ = ["bulk_writes"]


def bulk_writes(
    answers: Iterable[Mapping[str, Any]], endpoints: Endpoints, base: str
) -> tuple[dict[str, str], list[str]]:
    """The resources a bulk response (RFC 7644 section 3.7.3) reports written (ID -> resource
    type) and deleted, from its successful operations' ``location`` and ``method``."""
    written: dict[str, str] = {}
    deleted: list[str] = []
    for answer in answers:
        if not str(answer.get("status", "")).startswith("2"):
            continue
        parsed = endpoints.parse_uri(str(answer.get("location", "")), base)
        if parsed is None:
            continue
        if str(answer.get("method", "")).upper() == "DELETE":
            deleted.append(parsed[1])
        else:
            written[parsed[1]] = parsed[0]
    return written, deleted
