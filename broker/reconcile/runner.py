"""One reconciliation run of a peer (docs/reconciliation.md), as an operation with its report.

The run goes through phases, each resumable after a crash because where it is is written with
what it found, in one transaction per page:

1. ``peer``: read the peer's users, then its groups, a page at a time (paced); classify each
   page (``situations.classify_page``) from batched lookups; record the items.
2. ``home``: find what the peer lacks: accounts the pass never saw for mapped entities, and
   home's entities in the domain's scope with no account there (a page of home at a time).
3. ``actions``: unless it is a dry run, stop if it would deprovision more than the deletion
   threshold, else take each item's action in batches, each batch's mapping rows and outbox rows
   in one transaction; users before groups.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from broker.db import query
from broker.errors import ConflictError
from broker.home import HomeClient, HomeSchema
from broker.propagation.peer import PeerClient
from broker.reconcile.actions import take_actions
from broker.reconcile.reading import Lookups, Pace, home_keys, home_search, peer_page
from broker.reconcile.situations import (
    GROUP_CORRELATE,
    SITUATIONS,
    Item,
    Options,
    classify_page,
    deletion_limit,
    deletion_problem,
)
from broker.scim.rewrite import Translation

__all__ = ["RESOURCE_TYPES", "Reconciler", "Report", "Run"]

log = logging.getLogger(__name__)

HOME_PAGE = 200
"""Home's resources read per page into the run's copy."""

RESOURCE_TYPES = ("User", "Group")
"""Read in this order: users before the groups that name them."""


@dataclass(frozen=True)
class Run:
    """A run as the database holds it."""

    id: uuid.UUID
    domain_id: str
    dry_run: bool
    initial_sync: bool
    options: Options
    phase: str
    resource_type: str
    cursor: int
    peer_total: int
    reason: str | None = None

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> Run:
        return cls(
            record["id"],
            record["domain_id"],
            record["dry_run"],
            record["initial_sync"],
            Options.from_json(record["options"]),
            record["phase"],
            record["resource_type"],
            record["cursor"],
            record["peer_total"],
            record["reason"],
        )


@dataclass(frozen=True)
class Report:
    """How a run ended: its phase (done, stopped, failed), counts per situation, why it stopped."""

    run: uuid.UUID
    domain: str
    phase: str
    dry_run: bool
    counts: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.run),
            "domain": self.domain,
            "state": self.phase,
            "dryRun": self.dry_run,
            "counts": self.counts,
            "reason": self.reason,
        }


Progress = Callable[[str], None]


class Reconciler:
    """Runs reconciliations of one peer: reads it, classifies, acts."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        home: HomeClient,
        client: PeerClient,
        *,
        domain: str,
        scope: str | None,
        readable: list[str] | None,
        page_size: int = 100,
        rate: float = 10.0,
        deletion_threshold: int | None = None,
        progress: Progress = lambda _line: None,
        command: str = "broker reconcile",
    ) -> None:
        self.pool = pool
        self.home = home
        self.client = client
        self.domain = domain
        self.scope = scope
        self.readable = readable
        self.page_size = page_size
        self.pace = Pace(rate)
        self.deletion_threshold = deletion_threshold
        self.progress = progress
        self.command = f"{command} {domain}"

    # ------------------------------------------------------------------ starting

    async def start(
        self, options: Options, *, actor: str, initial_sync: bool = False, fresh: bool = False
    ) -> Run:
        """The domain's unfinished run (resumed with its own options), or a new one."""
        record = await self.pool.fetchrow(query("unfinished_reconciliation"), self.domain)
        if record is not None and not fresh:
            run = Run.from_record(record)
            if run.options != options or run.initial_sync != initial_sync:
                # A dry run never resumes a real one, nor the other way round.
                raise ConflictError(
                    f"{self.domain} has an unfinished run {run.id} with other options "
                    f"({'initial sync' if run.initial_sync else _described(run.options)}): run "
                    "with the same options to resume it, or add --fresh to start over"
                )
            self.progress(
                f"resuming run {run.id} of {self.domain} ({run.phase}, {run.resource_type}s from "
                f"{run.cursor}); --fresh starts over"
            )
            return run
        run_id = uuid.uuid4()
        request = {"domain": self.domain, **options.to_json(), "initial_sync": initial_sync}
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if record is not None:
                    await conn.execute(
                        query("abandon_reconciliation"), record["id"], "abandoned by --fresh"
                    )
                    await conn.execute(query("forget_home"), record["id"])
                await conn.execute(
                    query("claim_operation"),
                    run_id,
                    "reconcile",
                    f"reconcile:{run_id}",
                    request,
                    actor,
                )
                await conn.execute(
                    query("start_reconciliation"),
                    run_id,
                    self.domain,
                    options.dry_run,
                    initial_sync,
                    options.to_json(),
                )
                await conn.execute(query("audit"), actor, "reconcile.start", self.domain, request)
        except asyncpg.UniqueViolationError as exc:
            raise ConflictError(
                f"another run of {self.domain} started meanwhile: `broker operations` shows it"
            ) from exc
        return Run(
            run_id, self.domain, options.dry_run, initial_sync, options, "index", "User", 1, 0
        )

    # ------------------------------------------------------------------ running

    async def run(self, run: Run) -> Report:
        """Carry the run through its phases to the end; its report."""
        schema = await self.home.schema()
        translation = Translation(
            schema.refs, schema.endpoints, self.home.base_url, self.client.base_url
        )
        if run.phase == "index":
            run = await self._index_pass(run, schema)
        if run.phase == "peer":
            run = await self._peer_pass(run, schema, translation)
        if run.phase == "home":
            run = await self._home_pass(run)
        record = await self.pool.fetchrow(query("reconciliation_by_id"), run.id)
        problem = None
        if not run.dry_run:
            problem = await self._deletion_problem(run, record["peer_total"] if record else 0)
            if problem is None:
                done = await take_actions(self.pool, run.id, self.domain, run.options)
                self.progress(f"{self.domain}: {done} actions taken (through the outbox)")
        return await self._finish(run, "stopped" if problem else "done", problem)

    async def _correlate(self) -> list[str]:
        record = await self.pool.fetchrow(query("domain_correlate"), self.domain)
        return list(record["correlate"]) if record is not None else ["userName"]

    async def _index_pass(self, run: Run, schema: HomeSchema) -> Run:
        """Home's users and groups into the run's copy, a page at a time, then which users the
        domain's scope admits (a second listing, with the scope as its filter)."""
        correlate = await self._correlate()
        steps = ["User", "User:scope", "Group"] if self.scope else ["User", "Group"]
        cursor = run.cursor
        for step in steps[steps.index(run.resource_type) if run.resource_type in steps else 0 :]:
            resource_type, _, scoped = step.partition(":")
            endpoint = schema.endpoints.by_type.get(resource_type, f"/{resource_type}s")
            keys_of = correlate if resource_type == "User" else list(GROUP_CORRELATE)
            while True:
                docs, total = await home_search(
                    self.home,
                    endpoint,
                    self.scope if scoped else None,
                    start=cursor,
                    count=HOME_PAGE,
                    attributes=["id"] if scoped else None,
                )
                ids = [d["id"] for d in docs if isinstance(d.get("id"), str)]
                async with self.pool.acquire() as conn, conn.transaction():
                    if scoped:
                        await conn.execute(query("home_in_scope"), run.id, ids)
                    else:
                        await conn.execute(
                            query("record_home"),
                            run.id,
                            resource_type,
                            not self.scope or resource_type != "User",
                            ids,
                            [
                                "\x1f".join(home_keys(d, keys_of))
                                for d in docs
                                if d.get("id") in ids
                            ],
                            [d for d in docs if d.get("id") in ids],
                        )
                    cursor += len(docs)
                    await conn.execute(
                        query("advance_reconciliation"), run.id, "index", step, cursor, 0
                    )
                self.progress(
                    f"{self.domain}: home {step.lower()}s read {min(cursor - 1, total)}/{total}"
                )
                if not docs or cursor > total:
                    break
            cursor = 1
        await tidy(self.pool, "flush_home_keys", "analyze_home_copy")
        await self._advance(run.id, "peer", "User", 1)
        return _moved(run, "peer", "User", 1)

    async def _peer_pass(self, run: Run, schema: HomeSchema, translation: Translation) -> Run:
        """Every account of the peer, a page at a time, from where the run is."""
        lookups = Lookups(
            self.pool, run.id, translation, self.domain, self.readable, await self._correlate()
        )
        types = RESOURCE_TYPES[RESOURCE_TYPES.index(run.resource_type) :]
        cursor = run.cursor
        for resource_type in types:
            endpoint = schema.endpoints.by_type.get(resource_type, f"/{resource_type}s")
            while True:
                await self.pace.wait()
                accounts, total = await peer_page(self.client, endpoint, cursor, self.page_size)
                items = classify_page(await lookups.page(resource_type, accounts))
                cursor += len(accounts)
                await self._record(run, items, "peer", resource_type, cursor, len(accounts))
                self.progress(
                    f"{self.domain}: {resource_type.lower()}s read {min(cursor - 1, total)}/{total}"
                )
                if not accounts or cursor > total:
                    break
            cursor = 1
        await tidy(self.pool, "analyze_items")
        await self.pool.execute(query("disputes_across_pages"), run.id)
        await self._advance(run.id, "home", "User", 1)
        return _moved(run, "home", "User", 1)

    async def _home_pass(self, run: Run) -> Run:
        """What the peer lacks: mapped entities it never showed, and home's entities in the
        domain's scope with no account there (two statements over the run's copy of home)."""
        action = run.options.action("missing")
        await self.pool.execute(
            query("missing_mapped"), run.id, self.domain, action, list(RESOURCE_TYPES)
        )
        await self.pool.execute(query("unprovisioned"), run.id, self.domain, action)
        await self._advance(run.id, "actions", "User", 1)
        return _moved(run, "actions", "User", 1)

    async def _record(
        self, run: Run, items: list[Item], phase: str, resource_type: str, cursor: int, read: int
    ) -> None:
        """The page's items and where the run is, in one transaction."""
        options = run.options
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                query("record_items"),
                run.id,
                [i.resource_type for i in items],
                [i.situation for i in items],
                [i.external_id for i in items],
                [i.internal_id for i in items],
                [options.action(i.situation) for i in items],
                [dict(i.detail) for i in items],
            )
            await conn.execute(
                query("advance_reconciliation"), run.id, phase, resource_type, cursor, read
            )

    async def _advance(
        self, run_id: uuid.UUID, phase: str, resource_type: str, cursor: int
    ) -> None:
        await self.pool.execute(
            query("advance_reconciliation"), run_id, phase, resource_type, cursor, 0
        )

    async def _deletion_problem(self, run: Run, peer_total: int) -> str | None:
        deprovisions = sum(
            r["n"] - r["done"]
            for r in await self.pool.fetch(query("item_counts"), run.id)
            if r["action"] == "deprovision"
        )
        limit = deletion_limit(peer_total, self.deletion_threshold)
        return deletion_problem(
            deprovisions,
            peer_total,
            limit=limit,
            confirmed=run.options.confirm_deletions,
            command=self.command,
        )

    async def _finish(self, run: Run, phase: str, reason: str | None) -> Report:
        counts = await counts_of(self.pool, run.id)
        state = "done" if phase == "done" else "failed"
        progress = {self.domain: {"state": phase, "counts": counts, "reason": reason}}
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(query("finish_reconciliation"), run.id, phase, counts, reason)
            await conn.execute(query("forget_home"), run.id)
            await conn.execute(query("finish_planning"), run.id, state, progress)
            details = {"run": str(run.id), "state": phase, "counts": counts, "reason": reason}
            await conn.execute(
                query("audit"), "broker:reconcile", "reconcile.finish", self.domain, details
            )
        return Report(run.id, self.domain, phase, run.dry_run, counts, reason)


async def tidy(pool: asyncpg.Pool, *names: str) -> None:
    """The maintenance named ``names`` on the run's tables, which a pass has just filled: without
    it, until autovacuum comes (a minute or more later), each page's search of home's keys scans
    the GIN index's whole pending list and the planner takes the tables for empty, which made a
    run quadratic in the peer's size (docs/reconciliation.md, "Measured"). A database user that
    may not do it (not the tables' owner) makes the run slower, not wrong."""
    for name in names:
        try:
            await pool.execute(query(name))
        except asyncpg.InsufficientPrivilegeError as exc:
            log.warning("reconciliation: %s skipped (%s); the run may be slow", name, exc)


async def counts_of(pool: asyncpg.Pool, run_id: uuid.UUID) -> dict[str, Any]:
    """Counts per situation, and per action taken or planned."""
    counts: dict[str, Any] = {s: 0 for s in SITUATIONS}
    actions: dict[str, int] = {}
    for r in await pool.fetch(query("item_counts"), run_id):
        counts[r["situation"]] += r["n"]
        if r["action"] != "report":
            actions[r["action"]] = actions.get(r["action"], 0) + r["n"]
    return {"situations": counts, "actions": actions}


def _moved(run: Run, phase: str, resource_type: str, cursor: int) -> Run:
    return Run(
        run.id,
        run.domain_id,
        run.dry_run,
        run.initial_sync,
        run.options,
        phase,
        resource_type,
        cursor,
        run.peer_total,
    )


def _described(options: Options) -> str:
    """The options as the command line gives them."""
    words = ["--dry-run"] if options.dry_run else []
    words += [f"--on-{s} {a}" for s, a in sorted(options.actions.items())]
    if options.only is not None:
        words.append("--only " + ",".join(sorted(options.only)))
    if options.confirm_deletions:
        words.append(f"--confirm-deletions {options.confirm_deletions}")
    return " ".join(words)
