"""What a bulk response says was written: pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from broker.scim.rewrite import Endpoints
from broker.scim.writeonly import write_only_values

__all__ = ["bulk_write_only", "bulk_writes"]


def bulk_writes(
    answers: Iterable[Mapping[str, Any]], endpoints: Endpoints, base: str
) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """The resources a bulk response (RFC 7644 section 3.7.3) reports written (ID -> resource
    type) and deleted, from its successful operations' ``location`` and ``method``; and how
    each written one was written (ID -> create, put or patch: the last operation's)."""
    written: dict[str, str] = {}
    deleted: list[str] = []
    verbs: dict[str, str] = {}
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
            method = str(answer.get("method", "")).upper()
            verb = {"POST": "create", "PUT": "put"}.get(method, "patch")
            verbs[parsed[1]] = "create" if verbs.get(parsed[1]) == "create" else verb
    return written, deleted, verbs


def bulk_write_only(
    requests: Sequence[Mapping[str, Any]],
    answers: Sequence[Mapping[str, Any]],
    endpoints: Endpoints,
    base: str,
    names: Iterable[str],
) -> dict[str, dict[str, Any]]:
    """The write-only values (a password) each successful operation of a bulk request set, by
    the ID of the resource it wrote. An answer is paired with its request by ``bulkId``, or
    else by position (services answer in the order of the request)."""
    by_bulk_id = {r["bulkId"]: r for r in requests if isinstance(r.get("bulkId"), str)}
    found: dict[str, dict[str, Any]] = {}
    for n, answer in enumerate(answers):
        if not str(answer.get("status", "")).startswith("2"):
            continue
        request = by_bulk_id.get(answer.get("bulkId")) or (
            requests[n] if n < len(requests) else None
        )
        method = str(answer.get("method", "")).upper()
        if request is None or str(request.get("method", "")).upper() != method:
            continue
        parsed = endpoints.parse_uri(str(answer.get("location", "")), base)
        values = write_only_values(method, request.get("data"), names)
        if parsed is not None and values:
            found[parsed[1]] = values
    return found
