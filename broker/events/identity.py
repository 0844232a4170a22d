"""Merge and split notices for the domains that ask for them: which of a domain's IDs now denotes
another entity, in the domain's own terms. Pure.

RFC 9967 defines no such event; these carry the broker's own event URIs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.events.sets import envelope

__all__ = ["IDENTITY_EVENT_URIS", "identity_claims"]

IDENTITY_EVENT_URIS = {
    "merge": "urn:scim-id-broker:event:merge",
    "split": "urn:scim-id-broker:event:split",
}


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
