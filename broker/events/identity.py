"""Merge and split notices for the domains that ask for them: which of a domain's IDs now denotes
another entity, in the domain's own terms. Pure.

RFC 9967 defines no such event; these carry the broker's own event URIs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from broker.events.sets import envelope
from broker.mapping.rules import MappingRow, RowChange

__all__ = ["IDENTITY_EVENT_URIS", "identity_claims", "identity_notices"]

IDENTITY_EVENT_URIS = {
    "merge": "urn:scim-id-broker:event:merge",
    "split": "urn:scim-id-broker:event:split",
}


def identity_notices(
    kind: Literal["merge", "split"],
    changes: Iterable[RowChange],
    rows_after: Sequence[MappingRow],
    resource_type: str,
) -> list[dict[str, Any]]:
    """One notice per domain ID that a merge or split moved to another entity: the ID, the
    entity it now denotes and that entity's primary ID in the domain, and (for a split) the
    primary of the entity it left."""
    primaries = {
        (r.internal_id, r.domain): r.external_id for r in rows_after if r.primary and r.external_id
    }
    notices = []
    for change in changes:
        before, after = change.before, change.after
        if after is None or before.external_id is None or after.internal_id == before.internal_id:
            continue
        document: dict[str, Any] = {
            "domain": before.domain,
            "resource_type": resource_type,
            "id": before.external_id,
            "primary": primaries.get((after.internal_id, before.domain)),
        }
        if kind == "split":
            document["from"] = primaries.get((before.internal_id, before.domain))
        notices.append({"internal_id": after.internal_id, "kind": kind, "document": document})
    return notices


def identity_claims(
    *,
    issuer: str,
    audience: str,
    jti: str,
    txn: str,
    issued_at: int,
    kind: str,
    endpoint: str,
    notice: Mapping[str, Any],
) -> dict[str, Any]:
    """The SET of one notice: the subject is the domain's ID that moved."""
    event: dict[str, str] = {}
    if notice.get("primary"):
        event["primary"] = f"{endpoint}/{notice['primary']}"
    if notice.get("from"):
        event["splitFrom"] = f"{endpoint}/{notice['from']}"
    return envelope(
        issuer=issuer,
        audience=audience,
        jti=jti,
        txn=txn,
        issued_at=issued_at,
        sub_id={"format": "scim", "uri": f"{endpoint}/{notice['id']}"},
        events={IDENTITY_EVENT_URIS[kind]: event},
    )
