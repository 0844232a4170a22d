"""The registry of identity domains: the home and its peers."""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import asyncpg

from broker.credentials import NOTHING_RESERVED, Reserved, reserved_problem
from broker.db import query

if TYPE_CHECKING:
    from broker.db import Connection
from broker.errors import ConflictError, InvalidValueError, NotFoundError
from broker.http import outbound_url_problem
from broker.scim.filters import FilterError, parse_filter
from broker.scim.policy import DomainPolicy

__all__ = [
    "NAME_RULE",
    "Domain",
    "DomainStore",
    "DomainUpdate",
    "check_domain_name",
    "check_scim_url",
    "name_problem",
    "settings_problem",
    "stored_url_problems",
]

NAME_RULE = (
    "a domain name is 1 to 63 letters, digits, '.', '_' or '-', starts with a letter or digit "
    "and has no '..'"
)
"""The rule a new domain's name follows: it appears in URLs, SET audiences, logs and the
console. Names stored before the rule (``..`` inside) keep working; only new ones are refused."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def name_problem(name: str) -> str | None:
    """Why ``name`` may not be a new domain's name (pure), or None when it may."""
    if _NAME.fullmatch(name) is None or ".." in name:
        shown = name if name.isprintable() and len(name) <= 80 else repr(name[:80])
        return f"{shown} is not a domain name: {NAME_RULE}; choose another"
    return None


def settings_problem(
    credential_ref: str | None, scope_filter: str | None, reserved: Reserved
) -> str | None:
    """What is wrong with a domain's new credential reference or scope filter (the same check
    for ``broker domain add|update`` and ``PATCH /admin/domains/{domain}``), or None: the
    credential may not be one of the broker's own secrets (a peer would be sent it as its
    token; symlinks followed), and the scope is a SCIM filter (RFC 7644 section 3.4.2.2), since
    one that does not parse would break every request of the domain later."""
    problem = reserved_problem(credential_ref, reserved)
    if problem is not None:
        return problem
    if scope_filter is not None:
        try:
            parse_filter(scope_filter)
        except FilterError as exc:
            return (
                f"the scope {scope_filter!r} is not a SCIM filter ({exc.detail}): write one "
                'such as userName sw "a" (RFC 7644 section 3.4.2.2)'
            )
    return None


def _check_settings(
    credential_ref: str | None, scope_filter: str | None, reserved: Reserved
) -> None:
    problem = settings_problem(credential_ref, scope_filter, reserved)
    if problem is not None:
        raise InvalidValueError(problem)


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
"""A domain's name, as the ``domains_id_format`` constraint has it (migration 0001)."""


def check_domain_name(domain_id: str) -> None:
    """InvalidValueError unless ``domain_id`` is a name a domain may have (checked before the
    database sees it: a NUL would not even reach the constraint)."""
    if not NAME.fullmatch(domain_id):
        raise InvalidValueError(f"{domain_id!r}: {_CHECK_MESSAGES['domains_id_format']}")


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


CLEARABLE = frozenset({"scim_url", "credential_ref", "scope_filter", "read", "write"})
"""Settings an update may take away (``domain update --scope ''``; null in the admin API)."""


@dataclass(frozen=True)
class DomainUpdate:
    """What ``domain update`` (or ``PATCH /admin/domains/{domain}``) changes: None leaves a
    setting as it is; a name in ``clear`` takes it away (no URL, no credential, everything in
    scope, every attribute readable or writable)."""

    scim_url: str | None = None
    credential_ref: str | None = None
    push: bool | None = None
    scope_filter: str | None = None
    read: list[str] | None = None
    write: list[str] | None = None
    deprovision: Literal["delete", "suspend"] | None = None
    suspend_for: timedelta | None = None
    on_conflict: Literal["link", "dead_letter"] | None = None
    unlinkable: bool | None = None
    timestamp_precision: int | None = None
    clear: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = self.clear - CLEARABLE
        if unknown:
            raise InvalidValueError(f"cannot clear {', '.join(sorted(unknown))}")
        both = {f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        both &= self.clear
        if both:
            raise InvalidValueError(f"{', '.join(sorted(both))}: given and cleared at once")

    @property
    def empty(self) -> bool:
        return not self.clear and all(
            getattr(self, f.name) is None for f in dataclasses.fields(self) if f.name != "clear"
        )

    def applied_to(self, domain: Domain) -> dict[str, Any]:
        """The domain's settings after the update (pure), checked as ``add`` checks them."""
        policy = dict(domain.attribute_policy)
        for name in ("read", "write"):
            value = getattr(self, name)
            if name in self.clear:
                policy.pop(name, None)
            elif value is not None:
                policy[name] = value
        after: dict[str, Any] = {
            "scim_url": domain.scim_url,
            "credential_ref": domain.credential_ref,
            "push": domain.push,
            "scope_filter": domain.scope_filter,
            "attribute_policy": policy,
            "deprovision": domain.deprovision,
            "suspend_for": domain.suspend_for,
            "on_conflict": domain.on_conflict,
            "unlinkable": domain.unlinkable,
            "timestamp_precision": domain.timestamp_precision,
        }
        for name in after:
            value = getattr(self, name, None)
            if name in self.clear:
                after[name] = None
            elif value is not None:
                after[name] = value
        if after["timestamp_precision"] != 1 and not after["unlinkable"]:
            raise InvalidValueError(
                "a timestamp precision coarsens the timestamps of an unlinkable domain only: "
                "add --unlinkable, or set --timestamp-precision 1"
            )
        if after["push"] and not after["scim_url"]:
            raise InvalidValueError(_CHECK_MESSAGES["domains_push_needs_url"])
        check_scim_url(domain.id, after["scim_url"])
        return after


def changes(before: Domain, after: Domain) -> dict[str, list[Any]]:
    """The settings that differ, as [before, after] (for the audit log: references and
    settings only, never a secret)."""
    out = {}
    for name in (*_SETTINGS[1:], "status"):
        old, new = getattr(before, name), getattr(after, name)
        if old != new:
            out[name] = [_plain(old), _plain(new)]
    return out


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, timedelta) else value


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
        actor: str = "system",
        reserved: Reserved = NOTHING_RESERVED,
    ) -> Domain:
        """A new domain (or one removed with its mappings kept, back under its name), audited;
        ``reserved``: the broker's own secrets, which its credential may not name."""
        problem = name_problem(domain_id)
        if problem is not None and not await self._stored(domain_id):
            raise InvalidValueError(problem)
        _check_settings(credential_ref, scope_filter, reserved)
        if timestamp_precision != 1 and not unlinkable:
            raise InvalidValueError(
                "a timestamp precision coarsens the timestamps of an unlinkable domain only: "
                "add --unlinkable, or leave --timestamp-precision out"
            )
        check_domain_name(domain_id)
        check_scim_url(domain_id, scim_url)
        policy: dict[str, Any] = {}
        if read_attributes is not None:
            policy["read"] = read_attributes
        if write_attributes is not None:
            policy["write"] = write_attributes
        return await self._insert(
            actor,
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

    async def _insert(self, actor: str, domain_id: str, *settings: Any) -> Domain:
        """The checked domain written (``insert_domain``'s parameters after the name) and
        audited in one transaction; the database's refusals as errors saying what to do."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                record = await conn.fetchrow(query("insert_domain"), domain_id, *settings)
                if record is None:
                    raise ConflictError(
                        f"domain {domain_id} exists already: `broker domain show {domain_id}` "
                        f"shows it, `broker domain update {domain_id} ...` changes it"
                    )
                added = Domain.from_record(record)
                await conn.execute(query("audit"), actor, "domain_add", domain_id, _settings(added))
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
        return added

    async def set_scim_url(self, domain_id: str, scim_url: str, actor: str = "system") -> Domain:
        """The domain's SCIM base URL changed (the peer moved); checked as :meth:`add` checks it."""
        return await self.update(domain_id, DomainUpdate(scim_url=scim_url), actor=actor)

    async def update(
        self,
        domain_id: str,
        change: DomainUpdate,
        *,
        actor: str,
        reserved: Reserved = NOTHING_RESERVED,
    ) -> Domain:
        """The settings ``change`` gives, checked as :meth:`add` checks them, and audited."""
        if change.empty:
            raise InvalidValueError(
                "nothing to change: give at least one option of `broker domain add`"
            )
        _check_settings(change.credential_ref, change.scope_filter, reserved)
        async with self.pool.acquire() as conn, conn.transaction():
            before = await self._locked(conn, domain_id)
            after = change.applied_to(before)
            try:
                record = await conn.fetchrow(query("update_domain"), domain_id, *after.values())
            except asyncpg.CheckViolationError as exc:
                raise InvalidValueError(
                    _CHECK_MESSAGES.get(exc.constraint_name or "", str(exc))
                ) from exc
            assert record is not None
            updated = Domain.from_record(record)
            await conn.execute(
                query("audit"), actor, "domain_update", domain_id, changes(before, updated)
            )
        self._cache.pop(domain_id, None)
        return updated

    async def set_enabled(
        self, domain_id: str, enabled: bool, *, actor: str
    ) -> tuple[Domain, bool]:
        """Disable the domain (its tokens answer 403, its deliveries and SETs wait), or enable
        it again (what waited is due at once); the domain, and whether anything changed."""
        async with self.pool.acquire() as conn, conn.transaction():
            before = await self._locked(conn, domain_id)
            if (before.status == "disabled") != enabled:
                return before, False
            record = await conn.fetchrow(
                query("set_domain_status"), domain_id, "active" if enabled else "disabled"
            )
            assert record is not None
            if enabled:
                await conn.execute(query("release_domain_queue"), domain_id)
            action = "domain_enable" if enabled else "domain_disable"
            await conn.execute(
                query("audit"),
                actor,
                action,
                domain_id,
                {"status": [before.status, record["status"]]},
            )
        self._cache.pop(domain_id, None)
        return Domain.from_record(record), True

    async def _stored(self, domain_id: str) -> bool:
        """Whether ``domain_id`` is in the database (stored before the naming rule): a removed
        one added again gets its mappings back; any other is told that it exists already."""
        if "\x00" in domain_id:
            return False
        return await self.pool.fetchrow(query("domain_by_id"), domain_id) is not None

    async def footprint(self, domain_id: str) -> dict[str, int]:
        """What the domain has in the database, by kind of row (see ``domain remove``)."""
        records = await self.pool.fetch(query("domain_footprint"), domain_id)
        return {r["what"]: r["n"] for r in records}

    @staticmethod
    async def _locked(conn: Connection, domain_id: str) -> Domain:
        record = await conn.fetchrow(query("domain_for_change"), domain_id)
        if record is None:
            raise NotFoundError(
                f"there is no domain {domain_id}: `broker domain list` shows the domains"
            )
        return Domain.from_record(record)

    def forget(self, domain_id: str = "") -> None:
        """Drop what :meth:`cached` holds (of one domain, or all with ""): it changed elsewhere."""
        if not domain_id:
            self._cache.clear()
        else:
            self._cache.pop(domain_id, None)

    async def list(self) -> list[Domain]:
        return [Domain.from_record(r) for r in await self.pool.fetch(query("list_domains"))]

    async def get(self, domain_id: str) -> Domain:
        # A NUL is in no domain's name, and PostgreSQL refuses to even compare one.
        record = (
            None
            if "\x00" in domain_id
            else await self.pool.fetchrow(query("domain_by_id"), domain_id)
        )
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

    async def set_correlate(
        self, domain_id: str, attributes: Sequence[str], *, actor: str = "system"
    ) -> None:
        """How reconciliation recognises an existing account of the domain as a home entity's:
        ``attributes`` (in the peer's terms) compared case-insensitively (docs/reconciliation.md);
        audited (``domain_update``) in the same transaction."""
        async with self.pool.acquire() as conn, conn.transaction():
            if (
                await conn.fetchval(query("set_domain_correlate"), domain_id, list(attributes))
                is None
            ):
                raise NotFoundError(
                    f"there is no domain {domain_id}: `broker domain list` shows the domains"
                )
            await conn.execute(
                query("audit"), actor, "domain_update", domain_id, {"correlate": list(attributes)}
            )

    async def mapping_counts(self, domain_id: str) -> dict[str, int]:
        records = await self.pool.fetch(query("domain_mapping_counts"), domain_id)
        return {r["state"]: r["n"] for r in records}


def _settings(domain: Domain) -> dict[str, Any]:
    """A domain's settings, for the audit log (references, never a secret)."""
    return {name: _plain(getattr(domain, name)) for name in _SETTINGS}


_SETTINGS = (
    "kind",
    "scim_url",
    "credential_ref",
    "push",
    "scope_filter",
    "attribute_policy",
    "deprovision",
    "suspend_for",
    "on_conflict",
    "unlinkable",
    "timestamp_precision",
)
"""A domain's settings as the audit log records them (references, never a secret)."""


_CHECK_MESSAGES = {
    "domains_id_format": (
        "a domain name is 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"
    ),
    "domains_push_needs_url": "a push domain needs --scim-url: the broker provisions into it there",
    "domains_timestamp_precision_check": (
        "a timestamp precision is a whole number of seconds from 1 to 86400 (one day)"
    ),
}


def _audited(record: asyncpg.Record) -> dict[str, Any]:
    """A domain's settings as its audit entry records them (the credential's place, never a
    secret: ``credential_ref`` names where it is kept)."""
    skip = ("id", "created_at", "failing_since", "status")
    return {
        k: (v.total_seconds() if isinstance(v, timedelta) else v)
        for k, v in record.items()
        if k not in skip
    }
