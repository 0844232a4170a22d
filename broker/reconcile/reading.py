"""What reconciliation reads: a peer's accounts page by page (``startIndex``/``count``, paced to
a rate), home's resources in the domain's scope page by page, and for one page of accounts the
lookups the classifier needs, in batches (the mapping rows, home's resources, the candidates the
correlation rule finds). Nothing here writes; memory is bounded by a page."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from broker.db import query
from broker.errors import BrokerError
from broker.home import SEARCH_SCHEMA, HomeClient, HomeSchema
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

__all__ = ["Lookups", "Pace", "home_page", "peer_page"]

Json = dict[str, Any]
NOT_IN_PEER = "(not in the peer yet)"
"""What a reference to an entity the peer holds no account of reads as, in the document the
peer's account is compared with: never equal to what the peer holds, so the account is drifted
and its sync (after its references are created) makes it name them. Never sent anywhere."""
_CHUNK = 50
"""IDs or values per search sent to home."""


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


async def home_page(
    home: HomeClient, endpoint: str, scope: str | None, start: int, count: int
) -> tuple[list[str], int]:
    """IDs of one page of home's entities in ``scope`` at ``endpoint``."""
    found, total = await home_search(
        home, endpoint, scope, start=start, count=count, attributes=["id"]
    )
    return [r["id"] for r in found if isinstance(r.get("id"), str)], total


@dataclass(frozen=True)
class Lookups:
    """The batched lookups behind one page of a peer's accounts."""

    pool: asyncpg.Pool
    home: HomeClient
    schema: HomeSchema
    translation: Translation
    domain: str
    scope: str | None
    readable: Sequence[str] | None
    correlate: Sequence[str]

    async def page(self, resource_type: str, accounts: Sequence[Json]) -> Page:
        endpoint = self.schema.endpoints.by_type.get(resource_type, f"/{resource_type}s")
        ids = [a["id"] for a in accounts if isinstance(a.get("id"), str)]
        mapped = {
            r["external_id"]: Mapped(r["internal_id"], r["is_primary"], r["entity_state"])
            for r in await self.pool.fetch(query("reconcile_mapped"), self.domain, ids)
        }
        correlate = self.correlate if resource_type == "User" else GROUP_CORRELATE
        unmapped = [a for a in accounts if a.get("id") not in mapped]
        docs, matches = await self._matches(endpoint, unmapped, correlate)
        wanted = [m.internal_id for m in mapped.values() if m.primary] + [
            i for i in docs if i not in {m.internal_id for m in mapped.values()}
        ]
        docs.update(await self._by_id(endpoint, [i for i in wanted if i not in docs]))
        within = await self._within(endpoint, resource_type, list(docs))
        accounts_of = await self._primaries(
            list(dict.fromkeys(i for ids in matches.values() for i in ids))
        )
        candidates = {
            i: Candidate(i, i in within, accounts_of.get(i))
            for ids in matches.values()
            for i in ids
        }
        desired = await self._desired(resource_type, {i: docs.get(i) for i in wanted})
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

    async def _matches(
        self, endpoint: str, accounts: Sequence[Json], correlate: Sequence[str]
    ) -> tuple[dict[str, Json], dict[tuple[str, str], list[str]]]:
        """Home's entities holding the accounts' correlation values, and which values each holds."""
        docs: dict[str, Json] = {}
        wanted: set[tuple[str, str]] = set()
        raw: dict[str, set[str]] = {}
        for account in accounts:
            for attribute, value in _raw_values(account, correlate):
                raw.setdefault(attribute, set()).add(value)
                wanted.add((attribute.lower(), value.strip().lower()))
        for attribute, values in raw.items():
            ordered = sorted(values)
            for start in range(0, len(ordered), _CHUNK):
                chunk = ordered[start : start + _CHUNK]
                named = " or ".join(f"{attribute} eq {json.dumps(v)}" for v in chunk)
                found, _ = await home_search(
                    home=self.home, endpoint=endpoint, filter_=named, count=10 * len(chunk)
                )
                docs.update({d["id"]: d for d in found if isinstance(d.get("id"), str)})
        matches: dict[tuple[str, str], list[str]] = {}
        for internal_id, doc in docs.items():
            for key in correlation_values(doc, correlate) & wanted:
                matches.setdefault(key, []).append(internal_id)
        return docs, matches

    async def _by_id(self, endpoint: str, ids: Sequence[str]) -> dict[str, Json]:
        found: dict[str, Json] = {}
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            named = " or ".join(f"id eq {json.dumps(i)}" for i in chunk)
            docs, _ = await home_search(self.home, endpoint, named, count=len(chunk))
            found.update({d["id"]: d for d in docs if isinstance(d.get("id"), str)})
        return found

    async def _within(self, endpoint: str, resource_type: str, ids: list[str]) -> set[str]:
        """Which of ``ids`` the domain's scope admits (it bounds users; groups are all seen)."""
        if not self.scope or resource_type != "User" or not ids:
            return set(ids)
        return await self.home.ids_within(endpoint, ids, self.scope)

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


def _raw_values(account: Mapping[str, Any], attributes: Iterable[str]) -> list[tuple[str, str]]:
    """(attribute as the rule names it, value as the account holds it)."""
    lowered = {k.lower(): v for k, v in account.items()}
    found = []
    for attribute in attributes:
        name, _, sub = attribute.lower().partition(".")
        value = lowered.get(name)
        for v in value if isinstance(value, list) else [value]:
            if sub:
                v = {k.lower(): x for k, x in v.items()}.get(sub) if isinstance(v, dict) else None
            if isinstance(v, str) and v.strip():
                found.append((attribute, v))
    return found
