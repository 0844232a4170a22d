"""The registry of identity domains: the home and its peers."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg

from broker.db import query
from broker.errors import ConflictError, InvalidValueError, NotFoundError
from broker.http import outbound_url_problem
from broker.scim.policy import DomainPolicy

__all__ = ["Domain", "DomainStore", "check_scim_url", "stored_url_problems"]


def check_scim_url(domain_id: str, scim_url: str | None) -> None:
    """InvalidValueError when ``scim_url`` is not an address the broker may call out to."""
    if scim_url is None:
        return
    problem = outbound_url_problem(scim_url)
    if problem is not None:
        raise InvalidValueError(
            f"--scim-url {scim_url!r} of domain {domain_id} {problem}, for example "
            "https://scim.example.org/scim/v2"
        )


async def stored_url_problems(pool: asyncpg.Pool) -> list[str]:
    """The stored outbound URLs (domains' SCIM URLs, push receivers) that are not addresses the
    broker may call: each named with its domain and the command that fixes it. Stored before
    they were checked on the way in, or written to the database by hand."""
    problems = []
    for record in await pool.fetch(query("outbound_urls")):
        domain, kind, url = record["domain_id"], record["kind"], record["url"]
        if kind == "scim_url":
            problem = outbound_url_problem(url)
            fix = f"`broker domain update {domain} --scim-url URL` with a correct one"
        else:
            problem = outbound_url_problem(url, query=True)
            fix = f"`broker events subscribe {domain} --delivery push --endpoint URL` with a correct one"
        if problem is not None:
            what = "SCIM URL" if kind == "scim_url" else "SET receiver (events push endpoint)"
            problems.append(f"domain {domain}: its {what} {url!r} {problem}; fix: {fix}")
    return problems


@dataclass(frozen=True)
class Domain:
    id: str
    kind: Literal["home", "peer"]
    scim_url: str | None
    credential_ref: str | None
    """Where the outbound credential is found (``env:VAR``); never the secret itself."""
    push: bool
    """Whether the broker provisions into this domain (its IDs are then the ones it assigns)."""
    scope_filter: str | None
    attribute_policy: dict[str, Any]
    status: str
    created_at: datetime
    deprovision: Literal["delete", "suspend"] = "delete"
    """What a push peer gets when home deletes: DELETE, or active=false then DELETE later."""
    suspend_for: timedelta = timedelta(days=30)
    on_conflict: Literal["link", "dead_letter"] = "dead_letter"
    failing_since: datetime | None = None
    unlinkable: bool = False
    """Whether ``meta.created``, ``meta.lastModified`` and SET ``iat`` are coarsened to
    ``timestamp_precision`` for this domain (docs/security.md, "Unlinkability beyond IDs")."""
    timestamp_precision: int = 1
    """Seconds the domain's timestamps are truncated to when it is unlinkable."""

    @functools.cached_property
    def policy(self) -> DomainPolicy:
        """What the domain may see and do, for the request path's pure decisions."""
        read = self.attribute_policy.get("read")
        write = self.attribute_policy.get("write")
        return DomainPolicy(
            self.id,
            scope=self.scope_filter,
            read=tuple(read) if read is not None else None,
            write=tuple(write) if write is not None else None,
            unlinkable=bool(getattr(self, "unlinkable", False)),
        )

    @property
    def mints(self) -> bool:
        """Whether the broker issues this domain pairwise IDs (a push peer assigns its own)."""
        return not self.push

    def readable(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The attributes of ``doc`` the domain may read (``schemas``, ``id``, ``meta`` and its
        own ``externalId`` always)."""
        allowed = self.attribute_policy.get("read")
        if allowed is None:
            return doc
        permitted = {a.lower() for a in allowed} | {"schemas", "id", "meta", "externalid"}
        return {k: v for k, v in doc.items() if k.lower() in permitted}

    def may_read(self, attribute: str) -> bool:
        """Whether the domain may read ``attribute`` (a name, possibly with its schema URN)."""
        allowed = self.attribute_policy.get("read")
        if allowed is None:
            return True
        name = attribute.rsplit(":", 1)[-1].split(".", 1)[0].lower()
        return name in {a.lower() for a in allowed} or attribute.lower() in {
            a.lower() for a in allowed
        }

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> Domain:
        return cls(**dict(record.items()))


class DomainStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._cache: dict[str, tuple[float, Domain]] = {}

    async def add(
        self,
        domain_id: str,
        *,
        kind: Literal["home", "peer"] = "peer",
        scim_url: str | None = None,
        credential_ref: str | None = None,
        push: bool = False,
        scope_filter: str | None = None,
        read_attributes: list[str] | None = None,
        write_attributes: list[str] | None = None,
        deprovision: Literal["delete", "suspend"] = "delete",
        suspend_for: timedelta = timedelta(days=30),
        on_conflict: Literal["link", "dead_letter"] = "dead_letter",
        unlinkable: bool = False,
        timestamp_precision: int = 1,
    ) -> Domain:
        if timestamp_precision != 1 and not unlinkable:
            raise InvalidValueError(
                "a timestamp precision coarsens the timestamps of an unlinkable domain only: "
                "add --unlinkable, or leave --timestamp-precision out"
            )
        check_scim_url(domain_id, scim_url)
        policy: dict[str, Any] = {}
        if read_attributes is not None:
            policy["read"] = read_attributes
        if write_attributes is not None:
            policy["write"] = write_attributes
        try:
            record = await self.pool.fetchrow(
                query("insert_domain"),
                domain_id,
                kind,
                scim_url,
                credential_ref,
                push,
                scope_filter,
                policy,
                deprovision,
                suspend_for,
                on_conflict,
                unlinkable,
                timestamp_precision,
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "domains_one_home":
                raise ConflictError("there is a home domain already; a federation has one") from exc
            raise ConflictError(
                f"domain {domain_id} exists already: `broker domain show {domain_id}` shows it"
            ) from exc
        except asyncpg.CheckViolationError as exc:
            raise InvalidValueError(
                _CHECK_MESSAGES.get(exc.constraint_name or "", str(exc))
            ) from exc
        assert record is not None
        return Domain.from_record(record)

    async def set_scim_url(self, domain_id: str, scim_url: str) -> Domain:
        """The domain's SCIM base URL changed (the peer moved); checked as :meth:`add` checks it."""
        check_scim_url(domain_id, scim_url)
        record = await self.pool.fetchrow(query("update_domain_scim_url"), domain_id, scim_url)
        if record is None:
            raise NotFoundError(
                f"there is no domain {domain_id}: `broker domain list` shows the domains"
            )
        self._cache.pop(domain_id, None)
        return Domain.from_record(record)

    async def list(self) -> list[Domain]:
        return [Domain.from_record(r) for r in await self.pool.fetch(query("list_domains"))]

    async def get(self, domain_id: str) -> Domain:
        record = await self.pool.fetchrow(query("domain_by_id"), domain_id)
        if record is None:
            raise NotFoundError(
                f"there is no domain {domain_id}: `broker domain list` shows the domains"
            )
        return Domain.from_record(record)

    async def cached(self, domain_id: str, seconds: float = 5.0) -> Domain:
        """The domain as :meth:`get` reads it, at most ``seconds`` old: for the request path,
        where a change of a domain's settings may take that long to be seen."""
        now = time.monotonic()
        hit = self._cache.get(domain_id)
        if hit is not None and now - hit[0] < seconds:
            return hit[1]
        domain = await self.get(domain_id)
        self._cache[domain_id] = (now, domain)
        return domain

    async def set_correlate(self, domain_id: str, attributes: Sequence[str]) -> None:
        """How reconciliation recognises an existing account of the domain as a home entity's:
        ``attributes`` (in the peer's terms) compared case-insensitively (docs/reconciliation.md)."""
        if (
            await self.pool.fetchval(query("set_domain_correlate"), domain_id, list(attributes))
            is None
        ):
            raise NotFoundError(
                f"there is no domain {domain_id}: `broker domain list` shows the domains"
            )

    async def mapping_counts(self, domain_id: str) -> dict[str, int]:
        records = await self.pool.fetch(query("domain_mapping_counts"), domain_id)
        return {r["state"]: r["n"] for r in records}


_CHECK_MESSAGES = {
    "domains_id_format": (
        "a domain name is 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"
    ),
    "domains_push_needs_url": "a push domain needs --scim-url: the broker provisions into it there",
    "domains_timestamp_precision_check": (
        "a timestamp precision is a whole number of seconds from 1 to 86400 (one day)"
    ),
}
