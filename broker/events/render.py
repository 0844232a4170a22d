"""Making a domain's SETs: home's change in the domain's own terms, signed.

A SET is made once, the first time it is polled or pushed, and kept: a retransmission sends the
same bytes. What it says is translated for the domain in one round-trip per batch (its IDs,
minted if it has none and is not a push peer), checked against its scope at home, filtered by
its read list, and passed through the leak guard; one that would leak is never sent.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from broker.db import query
from broker.domains import Domain, DomainStore
from broker.events.identity import IDENTITY_EVENT_URIS, identity_claims
from broker.events.keyring import KeyRing
from broker.events.keys import sign_set
from broker.events.sets import Change, EventKind, domain_txn, set_claims
from broker.home import HomeClient
from broker.mapping.guard import LeakGuard
from broker.mapping.store import MappingStore
from broker.scim.guard import IdShape
from broker.scim.outbound import DomainView, ids_in_resources, resources_for_domain
from broker.scim.rewrite import Translation
from broker.scim.versions import VersionSealer, coarsen_epoch, present_meta

__all__ = ["EventRenderer", "Rendered"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rendered:
    id: int
    jti: str
    token: str


class EventRenderer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: MappingStore,
        home: HomeClient,
        keys: KeyRing,
        *,
        issuer: str,
        scim_base: str,
        id_pattern: str,
        guard: LeakGuard | None = None,
        sealer: VersionSealer,
        txn_key: Callable[[], bytes],
    ) -> None:
        self.pool = pool
        self.store = store
        self.home = home
        self.keys = keys
        self.issuer = issuer
        self.scim_base = scim_base.rstrip("/")
        self.guard = guard or LeakGuard(store, IdShape(id_pattern))
        self.domains = DomainStore(pool)
        self.sealer = sealer
        self.txn_key = txn_key

    async def render(
        self, domain_id: str, *, ids: Sequence[int] | None = None, limit: int = 1000
    ) -> list[Rendered]:
        """The domain's SETs (those named, or its first ``limit`` unsettled ones), in order,
        made and signed where they are not yet; those it must not get are settled as skipped."""
        records = await self.pool.fetch(
            query("events_to_render"), domain_id, list(ids) if ids is not None else None, limit
        )
        fresh = [r for r in records if r["token"] is None]
        made: dict[int, str] = {}
        if fresh:
            made = await self._make(await self.domains.get(domain_id), fresh)
        return [
            Rendered(r["id"], r["jti"], r["token"] or made[r["id"]])
            for r in records
            if r["token"] is not None or r["id"] in made
        ]

    async def _make(self, domain: Domain, records: list[asyncpg.Record]) -> dict[int, str]:
        schema = await self.home.schema()
        outward = Translation(schema.refs, schema.endpoints, self.home.base_url, self.scim_base)
        notices = [r for r in records if _kinds(r) & set(IDENTITY_EVENT_URIS)]
        changes = [r for r in records if not _kinds(r) & set(IDENTITY_EVENT_URIS)]
        full = [r for r in changes if r["detail"] == "full" and _kinds(r) != {"delete"}]
        docs = [dict(r["document"]) for r in full if r["document"]]
        wanted: dict[str, str | None] = {r["internal_id"]: r["resource_type"] for r in changes}
        for internal, rtype in ids_in_resources(docs, outward, resource_type=None).items():
            wanted.setdefault(internal, rtype)
        live = {r["internal_id"] for r in changes if "delete" not in _kinds(r)}
        hidden = await self._out_of_scope(domain, wanted, live)
        visible = {i: t for i, t in wanted.items() if i not in hidden}
        # A deleted entity is named only to a domain that knew it: nothing is minted for it.
        known = await self.store.translate_outbound(
            domain.id, {i: t for i, t in visible.items() if i not in live}, mint=False
        )
        found = await self.store.translate_outbound(
            domain.id, {i: t for i, t in visible.items() if i in live}, mint=domain.mints
        )
        found |= known
        views = {i: DomainView(o.external_id, o.domain_external_id) for i, o in found.items()}
        # The IDs a merge or split notice names are the domain's own (external IDs, never
        # internal ones), so the guard needs no list of them: it blocks only real internal IDs.
        in_play = set(wanted) | {r["internal_id"] for r in notices}
        key = await self.keys.current()
        now = int(time.time())
        claims: dict[int, dict[str, Any]] = {}
        skipped: list[int] = []
        by_id = {r["id"]: r for r in records}
        for record in records:
            if _kinds(record) & set(IDENTITY_EVENT_URIS):
                claims[record["id"]] = self._identity_claims(domain, record, outward, now)
                continue
            change = _visible_change(domain, record)
            if record["internal_id"] not in views or change is None:
                skipped.append(record["id"])
                continue
            claims[record["id"]] = self._claims(domain, record, change, views, outward, now)
        texts = [(str(i), orjson.dumps(c).decode()) for i, c in claims.items()]
        # The leak guard reads the whole batch at once (one lookup at most) and names each SET
        # that leaks, to hold back just those.
        for leak in await self.guard.leaks(texts, in_play=in_play):
            event_id = int(leak.where)
            await self._blocked(domain, by_id[event_id])
            del claims[event_id]
        made = {i: sign_set(c, key) for i, c in claims.items()}
        await self.pool.execute(
            query("save_rendered"), domain.id, list(made), list(made.values()), key.kid, skipped
        )
        return made

    async def _blocked(self, domain: Domain, record: asyncpg.Record) -> None:
        """A SET that would leak: never sent, marked failed, logged with a correlation ID."""
        correlation = uuid.uuid4().hex[:12]
        log.error(
            "leak guard blocked SET %s for %s (correlation ID %s)",
            record["jti"],
            domain.id,
            correlation,
        )
        await self.pool.execute(
            query("event_failed"),
            domain.id,
            record["id"],
            {"reason": f"blocked by the leak guard (correlation ID {correlation})"},
        )

    async def _out_of_scope(
        self, domain: Domain, wanted: dict[str, str | None], live: set[str]
    ) -> set[str]:
        """The users among ``wanted`` that home does not have within the domain's scope (a
        deleted one is judged by whether the domain knew it)."""
        if not domain.scope_filter:
            return set()
        users = [i for i, t in wanted.items() if t == "User" and i in live]
        others = [i for i, t in wanted.items() if t == "User" and i not in live]
        if not users:
            return set()
        schema = await self.home.schema()
        endpoint = schema.endpoints.by_type.get("User")
        if endpoint is None:
            return set(users)
        within = await self.home.ids_within(endpoint, users, domain.scope_filter)
        return {i for i in users if i not in within} - set(others)

    def _identity_claims(
        self, domain: Domain, record: asyncpg.Record, outward: Translation, now: int
    ) -> dict[str, Any]:
        notice = record["document"]
        endpoint = outward.endpoints.by_type.get(notice["resource_type"], "/Users")
        return identity_claims(
            issuer=self.issuer,
            audience=domain.id,
            jti=record["jti"],
            txn=self._txn(domain, record),
            issued_at=_issued_at(domain, now),
            kind=record["kinds"][0],
            endpoint=endpoint,
            notice=notice,
        )

    def _claims(
        self,
        domain: Domain,
        record: asyncpg.Record,
        change: Change,
        views: dict[str, DomainView],
        outward: Translation,
        now: int,
    ) -> dict[str, Any]:
        view = views[record["internal_id"]]
        endpoint = outward.endpoints.by_type.get(record["resource_type"], "/Users")
        data = None
        if record["detail"] == "full" and record["document"] and "delete" not in _kinds(record):
            (data,) = resources_for_domain(
                [dict(record["document"])],
                views,
                outward,
                resource_type=record["resource_type"],
            )
            if data is not None:
                data = present_meta(
                    data, domain=domain, internal_id=record["internal_id"], sealer=self.sealer
                )
                data = domain.readable(data)
        return set_claims(
            issuer=self.issuer,
            audience=domain.id,
            jti=record["jti"],
            txn=self._txn(domain, record),
            issued_at=_issued_at(domain, now),
            uri=f"{endpoint}/{view.external_id}",
            external_id=view.domain_external_id,
            change=change,
            detail=record["detail"],
            data=data,
        )

    def _txn(self, domain: Domain, record: asyncpg.Record) -> str:
        """The change's txn as this domain has it: its own, shared by none other."""
        return domain_txn(self.txn_key(), domain=domain.id, txn=str(record["txn"]))


def _issued_at(domain: Domain, now: int) -> int:
    """``iat``: for an unlinkable domain, truncated to its timestamp precision."""
    return coarsen_epoch(now, domain.timestamp_precision) if domain.unlinkable else now


def _visible_change(domain: Domain, record: asyncpg.Record) -> Change | None:
    """The change as the domain may hear of it: only attribute names it may read; None when a
    change of attributes touched none of those."""
    kinds = tuple(EventKind(k) for k in record["kinds"])
    touched = record["attributes"] or []
    names = tuple(a for a in touched if domain.may_read(a))
    if touched and not names and set(kinds) <= {EventKind.PUT, EventKind.PATCH}:
        return None
    return Change(kinds, names)


def _kinds(record: asyncpg.Record) -> set[str]:
    return set(record["kinds"])
