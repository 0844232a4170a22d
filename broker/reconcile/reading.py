"""What reconciliation reads: a peer's accounts page by page (``startIndex``/``count``, paced to
a rate), home's resources in the domain's scope page by page, and for one page of accounts the
lookups the classifier needs, in batches (the mapping rows, home's resources, the candidates the
correlation rule finds). Nothing here writes; memory is bounded by a page."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from broker.db import query
from broker.errors import BrokerError
from broker.home import SEARCH_SCHEMA, HomeClient
from broker.propagation.documents import peer_document
from broker.propagation.peer import PeerClient
from broker.reconcile.situations import (
    GROUP_CORRELATE,
    Candidate,
    Mapped,
    Page,
    correlation_values,
)
from broker.scim.rewrite import Translation, collect_ids

__all__ = ["Lookups", "Pace", "home_keys", "home_search", "peer_page"]

Json = dict[str, Any]
NOT_IN_PEER = "(not in the peer yet)"
"""What a reference to an entity the peer holds no account of reads as, in the document the
peer's account is compared with: never equal to what the peer holds, so the account is drifted
and its sync (after its references are created) makes it name them. Never sent anywhere."""


class Pace:
    """At most ``rate`` requests a second to the peer (0: no limit)."""

    def __init__(
        self,
        rate: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.monotonic = monotonic
        self.sleep = sleep
        self._next = 0.0

    async def wait(self) -> None:
        now = self.monotonic()
        if now < self._next:
            await self.sleep(self._next - now)
            now = self._next
        self._next = now + self.interval


async def peer_page(
    client: PeerClient, endpoint: str, start: int, count: int
) -> tuple[list[Json], int]:
    """One page of the peer's resources at ``endpoint`` from ``start`` (RFC 7644 section 3.4.2.4),
    and its totalResults."""
    answer = await client.call(
        "GET", endpoint, params={"startIndex": str(start), "count": str(count)}
    )
    if answer.status != 200 or not isinstance(answer.body, dict):
        raise BrokerError(
            f"peer {client.domain} answered HTTP {answer.status} to GET {endpoint}; check it is "
            f"up and the broker's token for it, then run the command again: it resumes",
            status=502,
        )
    resources = [r for r in answer.body.get("Resources", []) if isinstance(r, dict)]
    total = answer.body.get("totalResults")
    return resources, total if isinstance(total, int) else len(resources)


async def home_search(
    home: HomeClient,
    endpoint: str,
    filter_: str | None,
    *,
    start: int = 1,
    count: int = 100,
    attributes: Sequence[str] | None = None,
) -> tuple[list[Json], int]:
    """One page of home's resources at ``endpoint`` matching ``filter_`` (POST .search)."""
    body: Json = {"schemas": [SEARCH_SCHEMA], "startIndex": start, "count": count}
    if filter_:
        body["filter"] = filter_
    if attributes:
        body["attributes"] = list(attributes)
    answer = await home.request("POST", endpoint + "/.search", body=body)
    if answer.status != 200 or not isinstance(answer.body, dict):
        raise BrokerError(
            f"home answered HTTP {answer.status} to a search of {endpoint}; check [home] "
            "scim_url and the domain's scope filter, then run again: it resumes",
            status=502,
        )
    resources = [r for r in answer.body.get("Resources", []) if isinstance(r, dict)]
    total = answer.body.get("totalResults")
    return resources, total if isinstance(total, int) else len(resources)


def home_keys(doc: Mapping[str, Any], correlate: Sequence[str]) -> list[str]:
    """The entity's correlation keys as the run's copy of home indexes them."""
    return [
        f"{attribute}={value}" for attribute, value in sorted(correlation_values(doc, correlate))
    ]


@dataclass(frozen=True)
class Lookups:
    """The batched lookups behind one page of a peer's accounts: the mapping rows, and the run's
    copy of home (read a page at a time before the peer: one indexed query finds a page's
    candidates, where a search of home for each would cost home a scan of its users)."""

    pool: asyncpg.Pool
    run_id: uuid.UUID
    translation: Translation
    domain: str
    readable: Sequence[str] | None
    correlate: Sequence[str]

    async def page(self, resource_type: str, accounts: Sequence[Json]) -> Page:
        ids = [a["id"] for a in accounts if isinstance(a.get("id"), str)]
        mapped = {
            r["external_id"]: Mapped(r["internal_id"], r["is_primary"], r["entity_state"])
            for r in await self.pool.fetch(query("reconcile_mapped"), self.domain, ids)
        }
        correlate = self.correlate if resource_type == "User" else GROUP_CORRELATE
        wanted: set[tuple[str, str]] = set()
        for account in accounts:
            if account.get("id") not in mapped:
                wanted |= correlation_values(account, correlate)
        keys = sorted(f"{a}={v}" for a, v in wanted)
        found = await self.pool.fetch(query("home_by_keys"), self.run_id, keys)
        primaries = [m.internal_id for m in mapped.values() if m.primary]
        found += await self.pool.fetch(query("home_by_id"), self.run_id, primaries)
        docs = {r["internal_id"]: r["document"] for r in found}
        within = {r["internal_id"] for r in found if r["in_scope"]}
        matches: dict[tuple[str, str], list[str]] = {}
        for r in found:
            for key in set(r["keys"]) & set(keys):
                attribute, _, value = key.partition("=")
                ids_of = matches.setdefault((attribute, value), [])
                if r["internal_id"] not in ids_of:
                    ids_of.append(r["internal_id"])
        named = list(dict.fromkeys(i for ids_ in matches.values() for i in ids_))
        accounts_of = await self._primaries(named)
        candidates = {i: Candidate(i, i in within, accounts_of.get(i)) for i in named}
        desired = await self._desired(
            resource_type, {i: docs.get(i) for i in dict.fromkeys([*primaries, *named])}
        )
        return Page(
            resource_type,
            accounts,
            correlate,
            mapped,
            desired,
            frozenset(within),
            matches,
            candidates,
        )

    async def _primaries(self, ids: list[str]) -> dict[str, str]:
        """Entity -> its primary in the domain (an account, or a create under way)."""
        if not ids:
            return {}
        records = await self.pool.fetch(query("reconcile_primaries"), self.domain, ids)
        return {r["internal_id"]: r["external_id"] or "(create under way)" for r in records}

    async def _desired(
        self, resource_type: str, docs: Mapping[str, Json | None]
    ) -> dict[str, Json | None]:
        """Home's resources as the peer is to hold them, references in the peer's IDs."""
        named: dict[str, None] = {}
        for doc in docs.values():
            if doc is not None:
                named.update(
                    dict.fromkeys(collect_ids(doc, self.translation, resource_type=resource_type))
                )
        views = {}
        if named:
            records = await self.pool.fetch(query("reconcile_primaries"), self.domain, list(named))
            views = {r["internal_id"]: r["external_id"] for r in records if r["state"] == "active"}
        return {
            internal_id: None
            if doc is None
            else peer_document(
                doc,
                self.translation,
                lambda i, _t: views.get(i, NOT_IN_PEER),
                resource_type=resource_type,
                correlation_handle="",
                readable=self.readable,
            )
            for internal_id, doc in docs.items()
        }
