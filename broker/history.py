"""The history of one entity, like an identity provider's provisioning log: every write, delivery
(with its status and the peer's answer), SET, merge, split and audit entry that touched it,
across all domains, oldest first.

The rows are written where each thing happens, in its transaction (``entity_history``, 0013:
the write journal, the delivery and SET settles, the mapping store's merges and splits) and kept
``[propagation] history_retention``, whatever the outbox purge removed; audit entries are read
from the audit log itself. This module only reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from broker.db import query
from broker.errors import InvalidValueError, NotFoundError

__all__ = ["EntityHistory", "Event", "Target", "entity_history", "parse_target"]


@dataclass(frozen=True)
class Target:
    """What the operator named: an internal ID, or a domain's external ID."""

    internal_id: str | None = None
    domain: str | None = None
    external_id: str | None = None


def parse_target(text: str, domains: set[str]) -> Target:
    """``ENTITY`` or ``DOMAIN:EXTERNAL_ID`` (a known domain before the first colon). An internal
    ID may hold a colon: it is one unless what precedes the colon is a domain."""
    domain, colon, external_id = text.partition(":")
    if not text.strip():
        raise InvalidValueError("name an entity: its internal ID, or DOMAIN:EXTERNAL_ID")
    if colon and domain in domains:
        if not external_id:
            raise InvalidValueError(
                f"{text!r}: write DOMAIN:EXTERNAL_ID with the external ID after the colon"
            )
        return Target(domain=domain, external_id=external_id)
    if colon and not domain:
        raise InvalidValueError(
            f"{text!r}: write DOMAIN:EXTERNAL_ID with the domain before the colon"
        )
    return Target(internal_id=text)


@dataclass(frozen=True)
class Event:
    at: datetime
    entity: str
    kind: str
    """write, delivery, set, merge, split or audit."""
    domain: str | None
    status: str
    """How it went (done, retry, dead; acknowledged, failed, skipped; create, put, patch,
    delete; survivor, loser, source, new) or, for an audit entry, its action."""
    details: dict[str, Any]
    actor: str | None


@dataclass(frozen=True)
class EntityHistory:
    internal_id: str
    resource_type: str | None
    state: str | None
    merged_into: str | None
    merged: list[str]
    """Entities merged into this one: their history is listed too."""
    events: list[Event]

    def to_json(self) -> dict[str, Any]:
        return {
            "internalId": self.internal_id,
            "resourceType": self.resource_type,
            "state": self.state,
            "mergedInto": self.merged_into,
            "merged": self.merged,
            "events": [
                {
                    "at": e.at.isoformat(),
                    "entity": e.entity,
                    "kind": e.kind,
                    "domain": e.domain,
                    "status": e.status,
                    "actor": e.actor,
                    "details": e.details,
                }
                for e in self.events
            ],
        }


async def _resolve(pool: asyncpg.Pool, text: str) -> str:
    domains = {r["id"] for r in await pool.fetch(query("list_domains"))}
    target = parse_target(text, domains)
    if target.internal_id is not None:
        return target.internal_id
    found = await pool.fetchval(query("history_by_external"), target.domain, target.external_id)
    if found is None:
        raise NotFoundError(
            f"{target.domain} has no external ID {target.external_id!r}: "
            f"`broker mappings {target.domain}:...` resolves the ones it has"
        )
    return str(found)


async def entity_history(
    pool: asyncpg.Pool, text: str, *, since: datetime | None = None, limit: int = 1000
) -> EntityHistory:
    """The history of the entity ``text`` names (see :func:`parse_target`), the newest
    ``limit`` events, oldest first. NotFoundError when the broker never heard of it."""
    internal_id = await _resolve(pool, text)
    entity = await pool.fetchrow(query("history_entity"), internal_id)
    merged = [r["internal_id"] for r in await pool.fetch(query("history_merged_into"), internal_id)]
    records = await pool.fetch(query("history_of"), [internal_id, *merged], since, limit)
    if entity is None and not records:
        raise NotFoundError(
            f"the broker knows no entity {internal_id!r}: name an internal ID as home has it, or "
            "DOMAIN:EXTERNAL_ID (`broker domain list` shows the domains)"
        )
    events = [
        Event(
            at=r["at"],
            entity=r["internal_id"],
            kind=r["kind"],
            domain=r["domain_id"],
            status=r["status"],
            details=r["details"],
            actor=r["actor"],
        )
        for r in records
    ]
    return EntityHistory(
        internal_id=internal_id,
        resource_type=entity["resource_type"] if entity else None,
        state=entity["state"] if entity else None,
        merged_into=entity["merged_into"] if entity else None,
        merged=merged,
        events=events,
    )
