"""The delivery worker: claims outbox rows toward push peers and makes each peer's copy of an
entity match home's.

A ``sync`` row is state-based: it reads home's current resource when it runs and brings the peer
to it (create, the smallest PATCH, or deprovision), so a retry, a replay after a crash, or two
syncs of one entity in a row all converge on the same result and nothing is applied twice in
effect. Rows are claimed with ``FOR UPDATE SKIP LOCKED`` and a lease; a row is claimed only when
no older unfinished row of the same (peer, entity) exists, so order per entity holds across
processes while different entities proceed in parallel, bounded per peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
import orjson

from broker.db import listening, query
from broker.events.render import EventRenderer
from broker.home import HomeClient, HomeRefused, HomeSchema, HomeUnavailable
from broker.http import SET_TYPE, exchange
from broker.mapping.guard import LeakGuard
from broker.mapping.store import MappingStore, mint_id
from broker.propagation.documents import PATCH_SCHEMA, peer_document, scim_patch
from broker.propagation.peer import PeerClient, peer_credential
from broker.propagation.policy import Backoff, Failure, Verdict, judge
from broker.scim.guard import IdShape
from broker.scim.rewrite import Translation, collect_ids
from broker.secrets import SealError, SecretBox

if TYPE_CHECKING:
    from broker.db import Connection

__all__ = ["Deliverer", "Peer", "WorkerSettings"]

log = logging.getLogger(__name__)

# A resource a peer refuses as a duplicate is looked up by the attribute that must be unique.
_UNIQUE_BY = {"User": "userName", "Group": "displayName"}


@dataclass(frozen=True)
class WorkerSettings:
    concurrency: int = 4
    """Requests in flight at each peer, per process. Up to twice as many deliveries are under
    way there, so that while ``concurrency`` of them wait for the peer the others read home and
    the database: the peer's speed, not the broker's steps around each request, sets the pace."""
    lease: float = 120.0
    backoff: Backoff = field(default_factory=Backoff)
    quarantine_after: float = 300.0
    retention: float = 30 * 86400.0
    done_retention: float = 7 * 86400.0
    """Seconds a finished delivery is kept before the purge deletes it (0: kept for ever)."""
    purge_every: float = 600.0
    """Seconds between purges of finished deliveries."""
    idle_check: float = 1.0
    """How often due rows (backoff over) are looked for when no notification wakes the worker."""
    dependency_wait: float = 0.2
    """How long a group waits for its members' creates before it looks again."""
    conflict_patience: float = 300.0
    """Seconds a write refused with 409 (a value that must be unique is taken) is retried before
    it is a dead letter: the value may sit on an account changing hands (a split gave it to
    another entity, whose rename is on its way, or a delete is queued behind an outage)."""


@dataclass(frozen=True)
class Peer:
    id: str
    scim_url: str | None
    """None for a domain that only gets SETs pushed."""
    credential_ref: str | None
    scope_filter: str | None
    readable: list[str] | None
    status: str
    deprovision: str
    suspend_for: timedelta
    on_conflict: str
    events_endpoint: str | None = None
    """The domain's RFC 8935 receiver, if its SETs are pushed."""
    events_credential: str | None = None

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> Peer:
        policy = record["attribute_policy"] or {}
        return cls(
            id=record["id"],
            scim_url=record["scim_url"],
            credential_ref=record["credential_ref"],
            scope_filter=record["scope_filter"],
            readable=policy.get("read"),
            status=record["status"],
            deprovision=record["deprovision"],
            suspend_for=record["suspend_for"],
            on_conflict=record["on_conflict"],
            events_endpoint=record["events_endpoint"],
            events_credential=record["events_credential"],
        )


@dataclass(frozen=True)
class Claim:
    id: int
    internal_id: str
    attempts: int
    sealed_values: bytes | None
    """Write-only values (a password) the write set, to deliver with home's state."""
    kind: str = "sync"
    """sync (or provision: the same, for a split-off), move_memberships, delete_alias."""
    payload: Mapping[str, Any] = field(default_factory=dict)
    operation_id: uuid.UUID | None = None
    """The merge or split the delivery belongs to, whose progress it updates."""
    conflict_since: float | None = None
    """When (epoch seconds) the peer first refused this delivery with 409, if it did."""
    claimed_at: float = float("inf")
    """When (monotonic) the claim came back: every write the delivery stands for was in home
    before then (a write folds into a sync only while it waits). Unknown (the default): no
    earlier read of home is fresh enough, and the delivery reads its own."""


@dataclass
class _HomeRead:
    """A read of one resource from home, shared by the deliveries it is fresh enough for."""

    started: float
    """When (monotonic) the GET was sent."""
    answer: asyncio.Future[dict[str, Any] | None]


_HOME_READS_KEPT = 1024


class _Later(Exception):
    """Not yet: look again after ``delay`` seconds (not a failure, not an attempt)."""

    def __init__(self, delay: float, reason: str) -> None:
        super().__init__(reason)
        self.delay = delay


@dataclass
class _Lane:
    """One peer's share of this worker: how many of its deliveries are in flight, and until when
    it rests after a failure the peer caused."""

    active: int = 0
    paused_until: float = 0.0
    healthy_at: float = 0.0
    """When a success here last told the database the peer is healthy (it says so at most once
    a second while nothing fails)."""


Observer = Callable[[str, str], None]
"""Called with (peer, outcome) after each delivery: done, retry, dead, waiting."""


class Deliverer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        home: HomeClient,
        session: aiohttp.ClientSession,
        *,
        id_pattern: str,
        settings: WorkerSettings | None = None,
        observe: Observer | None = None,
        box: Callable[[], SecretBox] | None = None,
        events: Callable[[], EventRenderer] | None = None,
        guard: LeakGuard | None = None,
    ) -> None:
        self.pool = pool
        self.box = box
        self.events = events
        self.home = home
        self.session = session
        self.guard = guard or LeakGuard(MappingStore(pool), IdShape(id_pattern))
        self.settings = settings or WorkerSettings()
        self.observe = observe or (lambda _peer, _outcome: None)
        self.worker_id = f"worker-{uuid.uuid4().hex[:8]}"
        self._lanes: dict[str, _Lane] = {}
        self._clients: dict[str, PeerClient] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        """Per peer: its requests in flight from here (``concurrency`` at most)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._peers: tuple[float, list[Peer]] = (0.0, [])
        self._enqueued = False
        """A NOTIFY said something was enqueued since the peers were read (perhaps for a new
        peer)."""
        self._recheck: asyncio.TimerHandle | None = None
        self._home_reads: dict[str, _HomeRead] = {}
        """The latest read from home of each entity (the oldest dropped past a bound)."""
        self._settled: set[int] = set()
        """Deliveries already settled as done in the transaction that recorded their effect."""

    # ------------------------------------------------------------------ the loop

    async def run(self, listen_url: str | None = None) -> None:
        """Deliver until cancelled; woken by NOTIFY on ``broker_outbox`` when ``listen_url`` is
        given, and every ``idle_check`` seconds regardless."""
        purging = asyncio.create_task(self._purging(), name="outbox purge")
        async with self._listening(listen_url):
            try:
                while True:
                    self._wake.clear()
                    try:
                        await self.claim_and_start()
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                        log.warning("delivery worker cannot reach the database: %s", exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.settings.idle_check)
            finally:
                purging.cancel()
                if self._recheck is not None:
                    self._recheck.cancel()
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(purging, *self._tasks, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def _listening(self, url: str | None) -> AsyncIterator[None]:
        """Woken by NOTIFY while a connection listens (it reconnects after a database restart,
        and looks for work then); without one, every ``idle_check`` seconds."""
        if url is None:
            yield
            return
        # Back up (or up at last): what was enqueued meanwhile sent no notification here.
        async with listening(
            url, "broker_outbox", self._notified, on_up=lambda: self._notified("")
        ):
            yield

    def _notified(self, _payload: str) -> None:
        self._enqueued = True
        self._wake.set()

    async def claim_and_start(self) -> int:
        """Claim what is due for every peer with room, and start delivering it. The deliveries
        start once every peer's claim is in, so that one read of home serves the deliveries of
        one change to all of them (see ``_home_resource``)."""
        claimed: list[tuple[Peer, Claim, _Lane]] = []
        try:
            await self._claim(claimed)
        finally:
            for peer, claim, lane in claimed:
                task = asyncio.create_task(self._deliver(peer, claim, lane))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return len(claimed)

    async def _claim(self, claimed: list[tuple[Peer, Claim, _Lane]]) -> None:
        now = time.monotonic()
        for peer in await self._push_peers(now):
            lane = self._lanes.setdefault(peer.id, _Lane())
            slots = self.settings.concurrency
            room = 2 * slots - lane.active
            if peer.status == "quarantined":
                room = min(room, 1 - lane.active)  # one probe at a time
            elif lane.active > slots:
                # The peer's slots are all taken, and as many deliveries wait for them: claim
                # again once half have finished, many rows a claim rather than one a delivery.
                continue
            if room <= 0 or lane.paused_until > now:
                continue
            records = await self.pool.fetch(
                query("claim_deliveries"), peer.id, self.worker_id, room, self.settings.lease
            )
            claimed_at = time.monotonic()
            for record in records:
                claim = Claim(
                    record["id"],
                    record["internal_id"],
                    record["attempts"],
                    record["sealed_values"],
                    record["kind"],
                    record["payload"] or {},
                    record["operation_id"],
                    (record["last_error"] or {}).get("conflict_since"),
                    claimed_at,
                )
                lane.active += 1
                claimed.append((peer, claim, lane))

    async def _purging(self) -> None:
        """Purge every ``purge_every`` seconds, beside the deliveries (a first purge of a large
        history takes a while, and claims go on meanwhile)."""
        while True:
            await asyncio.sleep(self.settings.purge_every)
            try:
                await self.purge()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("the outbox purge cannot reach the database: %s", exc)

    async def purge(self, batch: int = 5000) -> int:
        """Delete finished deliveries older than ``done_retention``, a batch per statement so
        that no transaction holds many rows; returns how many went."""
        if self.settings.done_retention <= 0:
            return 0
        purged = 0
        while True:
            status = await self.pool.execute(
                query("purge_finished"), self.settings.done_retention, batch
            )
            deleted = int(status.split()[-1])
            purged += deleted
            if deleted < batch:
                break
        if purged:
            log.info(
                "purged %d finished deliveries older than %gs", purged, self.settings.done_retention
            )
        return purged

    async def _push_peers(self, now: float) -> list[Peer]:
        """The peers to deliver to. Every finished delivery and every enqueue wakes the loop:
        the list is read again once a second, after a peer's health changed here, and on an
        enqueue (which may be the first for a new peer) at most every 50 ms."""
        read_at, peers = self._peers
        if now - read_at >= 1.0 or (self._enqueued and now - read_at >= 0.05):
            self._enqueued = False
            peers = [Peer.from_record(r) for r in await self.pool.fetch(query("push_peers"))]
            self._peers = (now, peers)
        elif self._enqueued and self._recheck is None:
            # Woken too soon to read again: look once the 50 ms are over, not at the next
            # idle check (the enqueue may be the first for a new peer).
            def recheck() -> None:
                self._recheck = None
                self._wake.set()

            self._recheck = asyncio.get_running_loop().call_later(read_at + 0.05 - now, recheck)
        return peers

    async def drain(self, within: float = 30.0) -> None:
        """Deliver until nothing is due or in flight here (for tests and one-shot commands)."""
        deadline = time.monotonic() + within
        self._peers = (0.0, [])
        while time.monotonic() < deadline:
            # A pass that found a lane busy may see its deliveries all finish while it claims
            # for the other peers: only a pass that began with nothing running can end it.
            idle = not self._tasks
            started = await self.claim_and_start()
            if self._tasks:
                await asyncio.wait(
                    set(self._tasks),
                    timeout=self.settings.idle_check,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            elif idle and not started:
                return
        raise TimeoutError(f"deliveries still running after {within}s")

    # ------------------------------------------------------------------ one delivery

    async def _deliver(self, peer: Peer, claim: Claim, lane: _Lane) -> None:
        try:
            outcome = await self._attempt(peer, claim, lane)
            self.observe(peer.id, outcome)
        except Exception:
            correlation = uuid.uuid4().hex[:12]
            log.exception("delivery %s to %s: internal error %s", claim.id, peer.id, correlation)
            self.observe(peer.id, "error")
            # Retried with backoff rather than left claimed until the lease runs out.
            failure = Failure(
                Verdict.TRANSIENT,
                f"internal error in the broker (correlation ID {correlation} in its log)",
                peer_fault=False,
            )
            with contextlib.suppress(Exception):
                await self._failed(peer, claim, lane, failure)
        finally:
            self._settled.discard(claim.id)
            lane.active -= 1
            self._wake.set()

    async def _attempt(self, peer: Peer, claim: Claim, lane: _Lane) -> str:
        try:
            await self._perform(peer, claim)
        except _Later as later:
            due = datetime.now(UTC) + timedelta(seconds=later.delay)
            if later.delay < self.settings.idle_check:
                # A rescheduled row sends no notification: look again when it is due.
                asyncio.get_running_loop().call_later(later.delay, self._wake.set)
            await self._reschedule(
                claim, due, counted=False, record={"verdict": "waiting", "reason": str(later)}
            )
            return "waiting"
        except Failure as failure:
            return await self._failed(peer, claim, lane, failure)
        if claim.id not in self._settled:
            await self._settle(claim, "delivery_done")
        now = time.monotonic()
        if now - lane.healthy_at < 1.0:
            return "done"  # the database heard so less than a second ago, and nothing failed since
        lane.healthy_at = now
        recovered = await self.pool.fetchval(query("domain_delivered"), peer.id)
        if recovered:
            log.info("peer %s recovered: its queue drains now", peer.id)
            await self.pool.execute(query("release_queue"), peer.id)
            lane.paused_until = 0.0
            self._peers = (0.0, [])
        return "done"

    async def _failed(self, peer: Peer, claim: Claim, lane: _Lane, failure: Failure) -> str:
        record = failure.record()
        if failure.verdict is Verdict.PERMANENT:
            log.warning("delivery %s to %s dead-lettered: %s", claim.id, peer.id, failure.reason)
            await self._settle(claim, "delivery_dead", record)
            return "dead"
        quarantined = peer.status == "quarantined"
        if failure.peer_fault:
            lane.healthy_at = 0.0
            health = await self.pool.fetchrow(
                query("domain_failed"), peer.id, self.settings.quarantine_after
            )
            if health is not None and health["status"] == "quarantined" and not quarantined:
                log.warning(
                    "peer %s quarantined: failing since %s", peer.id, health["failing_since"]
                )
                quarantined = True
                self._peers = (0.0, [])
        delay = self.settings.backoff.delay(
            claim.attempts, retry_after=failure.retry_after, quarantined=quarantined
        )
        if failure.peer_fault:
            lane.paused_until = time.monotonic() + delay
        log.info(
            "delivery %s to %s failed (attempt %d), retrying in %.1fs: %s",
            claim.id,
            peer.id,
            claim.attempts + 1,
            delay,
            failure.reason,
        )
        due = datetime.now(UTC) + timedelta(seconds=delay)
        await self._reschedule(claim, due, counted=True, record=record)
        return "retry"

    async def _settle(self, claim: Claim, statement: str, *args: Any) -> None:
        """The delivery done or dead, and its operation's progress with it (one transaction, so
        that a crash in between cannot leave an operation propagating for ever)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self._settle_on(conn, claim, statement, *args)

    async def _done_with(self, conn: Connection, claim: Claim) -> None:
        """Settle the delivery as done in the caller's transaction, the one that records what it
        did (one commit instead of two). A merge's or split's delivery settles on its own,
        after, since its operation's row is locked only after what the record locks."""
        if claim.operation_id is None:
            await self._settle_on(conn, claim, "delivery_done")
            self._settled.add(claim.id)

    async def _settle_on(self, conn: Connection, claim: Claim, statement: str, *args: Any) -> None:
        if claim.operation_id is not None:
            # Settles of one operation's deliveries queue here, so each progress is computed
            # from what the others committed (a later statement sees them).
            await conn.execute(query("lock_operation"), claim.operation_id)
        await conn.execute(query(statement), claim.id, self.worker_id, *args)
        if claim.operation_id is not None:
            await conn.execute(query("refresh_operation"), claim.operation_id)

    async def _reschedule(
        self, claim: Claim, due: datetime, *, counted: bool, record: dict[str, Any]
    ) -> None:
        """Back to pending, due at ``due``, folding in a newer pending sync of the entity. A sync
        enqueued concurrently (after this statement's snapshot) trips the one-pending index:
        the statement runs again, and folds it."""
        for attempt in range(3):
            try:
                await self.pool.execute(
                    query("delivery_later"), claim.id, self.worker_id, due, counted, record
                )
                return
            except asyncpg.UniqueViolationError:
                if attempt == 2:
                    raise

    def _client(self, peer: Peer) -> PeerClient:
        assert peer.scim_url is not None, "only push peers get SCIM deliveries"
        client = self._clients.get(peer.id)
        token = peer_credential(peer.credential_ref)
        if client is None or client.base_url != peer.scim_url.rstrip("/") or client.token != token:
            slots = self._slots.setdefault(peer.id, asyncio.Semaphore(self.settings.concurrency))
            client = PeerClient(self.session, peer.scim_url, token, domain=peer.id, slots=slots)
            self._clients[peer.id] = client
        return client

    async def _perform(self, peer: Peer, claim: Claim) -> None:
        if claim.kind in ("sync", "provision"):
            await self._sync(peer, claim)
        elif claim.kind == "move_memberships":
            await self._move_memberships(peer, claim)
        elif claim.kind == "delete_alias":
            await self._delete_alias(peer, claim)
        elif claim.kind == "undo_create":
            await self._undo_create(peer, claim)
        elif claim.kind == "set":
            await self._push_set(peer, claim)
        else:
            raise Failure(
                Verdict.PERMANENT,
                f"this broker does not know deliveries of kind {claim.kind!r}: upgrade it",
                peer_fault=False,
            )

    async def _sync(self, peer: Peer, claim: Claim) -> None:
        """Make the peer's copy of the entity match home's current state."""
        client = self._client(peer)
        entity = await self.pool.fetchrow(query("entity_for_delivery"), peer.id, claim.internal_id)
        assert entity is not None, "outbox rows reference entities"
        if entity["state"] == "merged":
            return  # the merge's own deliveries clean up after the alias
        if claim.kind == "sync" and entity["provision_on_demand"] and not entity["known_here"]:
            return  # a split-off, held back until something needs it in this peer
        schema = await self._home_call(self.home.schema())
        resource_type = entity["resource_type"]
        endpoint = schema.endpoints.by_type.get(resource_type)
        home_doc = None
        if endpoint is not None and entity["state"] == "active":
            home_doc = await self._home_resource(endpoint, claim.internal_id, claim.claimed_at)
        if home_doc is not None and peer.scope_filter and resource_type == "User":
            within = await self._home_call(
                self.home.ids_within(endpoint or "/Users", [claim.internal_id], peer.scope_filter)
            )
            home_doc = home_doc if claim.internal_id in within else None
        if home_doc is None:
            await self._deprovision(peer, client, claim, entity, endpoint)
            return
        assert endpoint is not None
        translation = Translation(
            schema.refs, schema.endpoints, self.home.base_url, client.base_url
        )
        views = await self._references(peer, claim, home_doc, translation, resource_type, schema)
        handle = entity["correlation_handle"]
        first_attempt = False
        if entity["external_id"] is None:
            handle, first_attempt = await self._begin_create(peer, claim.internal_id)
        desired = peer_document(
            home_doc,
            translation,
            lambda internal, _t: views.get(internal),
            resource_type=resource_type,
            correlation_handle=handle,
            readable=peer.readable,
        )
        await self._guard(desired, {claim.internal_id, *views})
        write_only = self._open(claim)
        if entity["external_id"] is None:
            await self._create(
                peer,
                client,
                claim,
                endpoint,
                resource_type,
                desired,
                write_only,
                first_attempt,
                views,
            )
        else:
            await self._update(peer, client, claim, endpoint, entity, desired, write_only, views)

    def _open(self, claim: Claim) -> dict[str, Any]:
        """The write-only values the delivery carries (never logged, never kept in the copy)."""
        if claim.sealed_values is None:
            return {}
        if self.box is None:
            raise Failure(
                Verdict.PERMANENT, "the delivery carries a password but this worker has no key"
            )
        try:
            return self.box().open(claim.sealed_values)
        except SealError as exc:
            raise Failure(Verdict.PERMANENT, str(exc), peer_fault=False) from None

    async def _home_call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except HomeUnavailable as exc:
            raise Failure(Verdict.TRANSIENT, f"home unreachable: {exc}", peer_fault=False) from exc
        except HomeRefused as exc:
            raise Failure(
                Verdict.TRANSIENT,
                f"home refused a query ({exc}); check the home's logs",
                peer_fault=False,
            ) from exc

    async def _home_resource(
        self, endpoint: str, internal_id: str, fresh_since: float
    ) -> dict[str, Any] | None:
        """Home's resource (None: gone), read once for the deliveries of one change to several
        peers: a read sent after ``fresh_since`` (this delivery's claim) shows every write the
        delivery stands for, so its answer serves here too. Nothing changes the documents."""
        read = self._home_reads.get(internal_id)
        if read is not None and read.started >= fresh_since:
            return await asyncio.shield(read.answer)
        read = _HomeRead(time.monotonic(), asyncio.get_running_loop().create_future())
        self._home_reads.pop(internal_id, None)
        self._home_reads[internal_id] = read
        if len(self._home_reads) > _HOME_READS_KEPT:
            del self._home_reads[next(iter(self._home_reads))]
        try:
            read.answer.set_result(await self._read_home(endpoint, internal_id))
        except asyncio.CancelledError:
            read.answer.cancel()
            raise
        except Exception as exc:
            if self._home_reads.get(internal_id) is read:
                del self._home_reads[internal_id]
            read.answer.set_exception(exc)
            read.answer.exception()  # retrieved: the deliveries sharing it raise it themselves
            raise
        return read.answer.result()

    async def _read_home(self, endpoint: str, internal_id: str) -> dict[str, Any] | None:
        response = await self._home_call(self.home.request("GET", f"{endpoint}/{internal_id}"))
        if response.status == 404:
            return None
        if response.status != 200 or not isinstance(response.body, dict):
            raise Failure(
                Verdict.TRANSIENT,
                f"home answered HTTP {response.status} for the entity; retrying",
                peer_fault=False,
            )
        body: dict[str, Any] = response.body
        return body

    async def _references(
        self,
        peer: Peer,
        claim: Claim,
        home_doc: Mapping[str, Any],
        translation: Translation,
        resource_type: str,
        schema: HomeSchema,
    ) -> dict[str, str]:
        """The peer's IDs of everything the resource refers to. A member not yet created in the
        peer is enqueued and this delivery waits for it; one whose delivery was tried and did not
        create it (out of scope, gone from home, dead-lettered) is left out."""
        named = collect_ids(dict(home_doc), translation, resource_type=resource_type)
        named.pop(claim.internal_id, None)
        if not named:
            return {}
        if peer.scope_filter:
            users = [i for i, t in named.items() if t in (None, "User")]
            if users:
                within = await self._home_call(
                    self.home.ids_within(
                        schema.endpoints.by_type.get("User", "/Users"), users, peer.scope_filter
                    )
                )
                named = {i: t for i, t in named.items() if t not in (None, "User") or i in within}
        records = await self.pool.fetch(query("peer_ids"), peer.id, list(named))
        views = {r["internal_id"]: r["external_id"] for r in records if r["external_id"]}
        waiting = [r["internal_id"] for r in records if not r["external_id"] and r["waiting"]]
        untried = [
            r for r in records if not r["external_id"] and not r["waiting"] and not r["tried"]
        ]
        if untried:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    query("record_writes"),
                    [r["internal_id"] for r in untried],
                    [named[r["internal_id"]] or "unknown" for r in untried],
                    [],
                )
                # A merged member is provisioned as its survivor, whose account it would name
                # (a provisioning of the merged entity itself would do nothing, for ever).
                await conn.execute(
                    query("enqueue_provision"),
                    peer.id,
                    list(dict.fromkeys(r["target"] for r in untried)),
                )
        if waiting or untried:
            raise _Later(
                self.settings.dependency_wait,
                f"waiting for {len(waiting) + len(untried)} referenced resources to be created first",
            )
        return views

    async def _guard(self, document: Any, in_play: set[str]) -> None:
        """Fail closed: nothing the peer receives may hold an internal ID (in play here, or any
        the broker knows). What a domain wrote into a text attribute is not one."""
        leak = await self.guard.check([("body", orjson.dumps(document).decode())], in_play=in_play)
        if leak is not None:
            raise Failure(
                Verdict.PERMANENT,
                f"withheld: the document for the peer would expose an internal identifier "
                f"({leak.reason}, in {leak.where}); check home's data for IDs in free text",
                peer_fault=False,
            )

    async def _begin_create(self, peer: Peer, internal_id: str) -> tuple[str, bool]:
        """The create's correlation handle, and whether this is its first attempt."""
        fresh = await self.pool.fetchval(query("begin_create"), internal_id, peer.id, mint_id())
        if fresh is not None:
            return fresh, True
        row = await self.pool.fetchrow(query("pending_handle"), internal_id, peer.id)
        if row is None or row["state"] != "pending_create":
            # A merge or split gave the entity an account here meanwhile (or it is gone).
            raise _Later(0, "the entity's primary in the peer changed meanwhile: looking again")
        handle: str = row["correlation_handle"]
        return handle, False

    async def _create(
        self,
        peer: Peer,
        client: PeerClient,
        claim: Claim,
        endpoint: str,
        resource_type: str,
        desired: dict[str, Any],
        write_only: Mapping[str, Any],
        first_attempt: bool,
        views: Mapping[str, str],
    ) -> None:
        # A create whose answer was lost left the resource in the peer under the handle; on the
        # first attempt there can be none.
        found = (
            []
            if first_attempt
            else await client.find_by(endpoint, "externalId", desired["externalId"])
        )
        linked = False
        if found:
            peer_id = found[0]
        else:
            answer = await client.call("POST", endpoint, body={**desired, **write_only})
            if answer.status == 409 and peer.on_conflict == "link" and resource_type in _UNIQUE_BY:
                key = _UNIQUE_BY[resource_type]
                matches = (
                    await client.find_by(endpoint, key, desired[key]) if key in desired else []
                )
                if len(matches) != 1:
                    raise judge(answer.status, answer.body, answer.headers, f"POST {endpoint}")
                peer_id, linked = matches[0], True
            elif answer.status != 201 or not isinstance(answer.body, dict):
                failure = judge(answer.status, answer.body, answer.headers, f"POST {endpoint}")
                if not await self._create_wanted(peer, desired["externalId"]):
                    return  # a merge or split cancelled it meanwhile: nothing to do
                if answer.status == 409:
                    await self._unblock(peer, client, endpoint, resource_type, desired, None)
                self._patient(failure, claim)
                raise failure
            elif isinstance(answer.body.get("id"), str):
                peer_id = answer.body["id"]
            else:
                raise Failure(Verdict.PERMANENT, f"POST {endpoint}: the peer's answer has no id")
        if linked or found:
            # What exists there is what an earlier attempt sent, or the peer's own: it is brought
            # to home's state now, as the copy recorded below says.
            answer = await client.call(
                "PUT", f"{endpoint}/{peer_id}", body={**desired, **write_only}
            )
            if answer.status != 200:
                failure = judge(answer.status, answer.body, answer.headers, f"PUT {endpoint}/...")
                if not await self._create_wanted(peer, desired["externalId"]):
                    return  # a merge or split cancelled it meanwhile (its undo_create follows)
                if answer.status == 409:
                    await self._unblock(peer, client, endpoint, resource_type, desired, peer_id)
                self._patient(failure, claim)
                raise failure
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                stale = await self._copy_is_stale(conn, peer, claim.internal_id, views)
                # The row is found by its handle: a merge may have moved it to its survivor.
                owner = await conn.fetchval(
                    query("finish_create"), desired["externalId"], peer.id, peer_id
                )
                if owner is not None:
                    await conn.execute(query("save_copy"), peer.id, owner, desired, None)
                    if stale:
                        await conn.execute(
                            query("enqueue_sync_to"), peer.id, [owner], datetime.now(UTC)
                        )
                if owner is not None or linked:
                    await self._done_with(conn, claim)
        except asyncpg.UniqueViolationError as exc:
            raise Failure(
                Verdict.PERMANENT,
                f"the peer's resource {peer_id} is already mapped to another entity; "
                "merge the two entities, or remove the duplicate in the peer",
                peer_fault=False,
            ) from exc
        if owner is None and not linked:
            # A merge cancelled the create while it was on its way (the survivor already has an
            # account there): the resource it made goes again, so the peer holds the entity once.
            log.info("delivery to %s: a create cancelled by a merge is undone", peer.id)
            answer = await client.call("DELETE", f"{endpoint}/{peer_id}")
            if answer.status not in (200, 204, 404):
                raise judge(answer.status, answer.body, answer.headers, f"DELETE {endpoint}/...")

    async def _unblock(
        self,
        peer: Peer,
        client: PeerClient,
        endpoint: str,
        resource_type: str,
        desired: Mapping[str, Any],
        account: str | None,
    ) -> None:
        """A write refused with 409: if another account of the broker's holds the unique value
        (accounts that changed hands can hold each other's values, a cycle no order of writes
        can break), that account's value is parked aside and its own sync set to run again.
        An alias waiting for its delete counts too: its delete may be queued behind this very
        write (the alias of the entity being written), so waiting for it would never end."""
        key = _UNIQUE_BY.get(resource_type)
        value = desired.get(key) if key else None
        if key is None or not isinstance(value, str):
            return
        for holder in await client.find_by(endpoint, key, value):
            if holder == account or not await self.pool.fetchval(
                query("broker_account"), peer.id, holder
            ):
                continue  # not the broker's account: a person decides (dead letter later)
            parked = f"{value}~{holder[:8]}"
            log.info("delivery to %s: %s of account %s parked to free it", peer.id, key, holder)
            answer = await client.call(
                "PATCH",
                f"{endpoint}/{holder}",
                body={
                    "schemas": [PATCH_SCHEMA],
                    "Operations": [{"op": "replace", "path": key, "value": parked}],
                },
            )
            if answer.status in (200, 204):
                # Its owner now (an alias waiting for its delete has none; it may have changed
                # hands meanwhile) gets its own values back.
                async with self.pool.acquire() as conn, conn.transaction():
                    owner = await conn.fetchval(query("account_owner"), peer.id, holder)
                    if owner is not None:
                        await conn.execute(query("drop_copy"), peer.id, owner)
                        await conn.execute(
                            query("enqueue_sync_to"), peer.id, [owner], datetime.now(UTC)
                        )

    def _patient(self, failure: Failure, claim: Claim) -> None:
        """A 409 is retried for ``conflict_patience`` seconds from the first one before it is a
        dead letter."""
        if failure.status != 409:
            return
        since = claim.conflict_since or time.time()
        failure.conflict_since = since
        if time.time() - since < self.settings.conflict_patience:
            failure.verdict, failure.peer_fault = Verdict.TRANSIENT, False
            failure.reason += (
                f" (retried for {self.settings.conflict_patience:.0f} s first: the value may be"
                " on an account changing hands)"
            )

    async def _create_wanted(self, peer: Peer, handle: str) -> bool:
        """Whether the create of ``handle`` is still wanted (its pending row is there)."""
        state = await self.pool.fetchval(query("create_state"), handle, peer.id)
        return bool(state == "pending_create")

    async def _update(
        self,
        peer: Peer,
        client: PeerClient,
        claim: Claim,
        endpoint: str,
        entity: asyncpg.Record,
        desired: dict[str, Any],
        write_only: Mapping[str, Any],
        views: Mapping[str, str],
    ) -> None:
        internal_id = claim.internal_id
        peer_id = entity["external_id"]
        copy = entity["copy"]
        ops = scim_patch(copy, desired) if copy is not None else None
        if ops == [] and entity["suspended_at"] is None and not write_only:
            return  # the peer holds what home holds
        if ops is not None and await client.supports_patch():
            if entity["suspended_at"] is not None and "active" not in desired:
                ops.append({"op": "replace", "path": "active", "value": True})
            ops += [{"op": "replace", "path": k, "value": v} for k, v in write_only.items()]
            answer = await client.call(
                "PATCH",
                f"{endpoint}/{peer_id}",
                body={"schemas": [PATCH_SCHEMA], "Operations": ops},
            )
            what = f"PATCH {endpoint}/..."
        else:
            answer = await client.call(
                "PUT", f"{endpoint}/{peer_id}", body={**desired, **write_only}
            )
            what = f"PUT {endpoint}/..."
        if answer.status == 404:
            # The peer lost it: forget the row, and create it again on the next attempt.
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    query("retire_primary"), internal_id, peer.id, self.settings.retention
                )
                await conn.execute(query("drop_copy"), peer.id, internal_id)
                await conn.execute(query("resync_groups_naming"), [peer.id], [peer_id])
            raise _Later(0, "the peer no longer has the resource: creating it again")
        if answer.status not in (200, 204):
            failure = judge(answer.status, answer.body, answer.headers, what)
            if answer.status == 409:
                resource_type = entity["resource_type"]
                await self._unblock(peer, client, endpoint, resource_type, desired, peer_id)
            self._patient(failure, claim)
            raise failure
        async with self.pool.acquire() as conn, conn.transaction():
            stale = await self._copy_is_stale(conn, peer, internal_id, views)
            # The copy the write was computed from may have changed on its way (a merge's
            # membership move wrote to the same group, a value was parked aside): what the peer
            # holds is then not known, and the entity is synced again from no copy (a PUT).
            recorded = await conn.fetchval(
                query("save_copy_of"),
                peer.id,
                internal_id,
                desired,
                None,
                peer_id,
                entity["copy_version"],
            )
            if not recorded:
                await conn.execute(query("drop_copy"), peer.id, internal_id)
            if stale or not recorded:
                await conn.execute(
                    query("enqueue_sync_to"), peer.id, [internal_id], datetime.now(UTC)
                )
            await self._done_with(conn, claim)

    async def _copy_is_stale(
        self, conn: Connection, peer: Peer, internal_id: str, views: Mapping[str, str]
    ) -> bool:
        """Before a delivery records what it wrote to the peer (on the caller's transaction):
        hold what that copy depends on until it commits, and say whether a reference it sent
        (``views``: entity -> the peer's ID, as translated before the write) is stale already.

        The entity and the entities it names are share-locked: a merge or split of them (which
        locks them first) finishes before, and the copy is then recorded against its result, or
        waits, and then finds the copy (to drop it, or to resync the groups naming an account it
        moved). The named accounts' rows are share-locked too, for the same reason: a deprovision
        or an alias's delete retires them. A reference that translates to another account now
        (merged, handed over, retired while the write was on its way) makes the copy stale: the
        caller syncs the entity again."""
        await conn.execute(query("share_entities"), sorted({internal_id, *views}))
        if not views:
            return False
        await conn.execute(query("share_accounts"), peer.id, sorted(set(views.values())))
        return bool(
            await conn.fetchval(
                query("references_moved"), peer.id, list(views), list(views.values())
            )
        )

    async def _deprovision(
        self,
        peer: Peer,
        client: PeerClient,
        claim: Claim,
        entity: asyncpg.Record,
        endpoint: str | None,
    ) -> None:
        """Home no longer has the entity (or the peer may no longer see it)."""
        peer_id = entity["external_id"]
        if peer_id is None or endpoint is None:
            if entity["mapping_state"] == "pending_create" and endpoint is not None:
                # A create was tried and its answer lost: what it made there goes again.
                handle = entity["correlation_handle"]
                for made in await client.find_by(endpoint, "externalId", handle):
                    answer = await client.call("DELETE", f"{endpoint}/{made}")
                    if answer.status not in (200, 204, 404):
                        raise judge(
                            answer.status, answer.body, answer.headers, f"DELETE {endpoint}/..."
                        )
            # Drop the pending create, if any.
            await self.pool.execute(
                query("retire_primary"), claim.internal_id, peer.id, self.settings.retention
            )
            return
        suspended_at = entity["suspended_at"]
        if peer.deprovision == "suspend":
            now = datetime.now(UTC)
            if suspended_at is None:
                answer = await client.call(
                    "PATCH",
                    f"{endpoint}/{peer_id}",
                    body={
                        "schemas": [PATCH_SCHEMA],
                        "Operations": [{"op": "replace", "path": "active", "value": False}],
                    },
                )
                if answer.status not in (200, 204, 404):
                    raise judge(answer.status, answer.body, answer.headers, f"PATCH {endpoint}/...")
                async with self.pool.acquire() as conn, conn.transaction():
                    await conn.execute(
                        query("save_copy"),
                        peer.id,
                        claim.internal_id,
                        {**(entity["copy"] or {}), "active": False},
                        now,
                    )
                    await conn.execute(
                        query("enqueue_sync_to"),
                        peer.id,
                        [claim.internal_id],
                        now + peer.suspend_for,
                    )
                return
            if suspended_at + peer.suspend_for > now:
                await self.pool.execute(
                    query("enqueue_sync_to"),
                    peer.id,
                    [claim.internal_id],
                    suspended_at + peer.suspend_for,
                )
                return
        answer = await client.call("DELETE", f"{endpoint}/{peer_id}")
        if answer.status not in (200, 204, 404):
            raise judge(answer.status, answer.body, answer.headers, f"DELETE {endpoint}/...")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                query("retire_primary"), claim.internal_id, peer.id, self.settings.retention
            )
            await conn.execute(query("drop_copy"), peer.id, claim.internal_id)
            # Not every peer drops a deleted member from its groups: the broker's groups that
            # named it are synced again.
            await conn.execute(query("resync_groups_naming"), [peer.id], [peer_id])

    # ------------------------------------------------------------------ merge clean-up

    async def _alias_endpoint(
        self, peer: Peer, claim: Claim
    ) -> tuple[str, str, asyncpg.Record | None] | None:
        """The alias the task acts on, its endpoint and the survivor as the peer has it, or None
        when the alias no longer waits for its delete (a split moved it back, or the task ran)."""
        alias = claim.payload.get("external_id")
        if not isinstance(alias, str):
            raise Failure(Verdict.PERMANENT, "the task names no alias", peer_fault=False)
        row = await self.pool.fetchrow(query("alias_for_cleanup"), peer.id, alias)
        if row is None:
            return None
        schema = await self._home_call(self.home.schema())
        entity = await self.pool.fetchrow(query("entity_for_delivery"), peer.id, claim.internal_id)
        resource_type = entity["resource_type"] if entity is not None else "User"
        return alias, schema.endpoints.by_type.get(resource_type, f"/{resource_type}s"), entity

    async def _move_memberships(self, peer: Peer, claim: Claim) -> None:
        """Groups of the peer holding the alias hold the survivor's primary instead."""
        found = await self._alias_endpoint(peer, claim)
        if found is None:
            return
        alias, _endpoint, entity = found
        primary = (entity["external_id"] if entity is not None else None) or claim.payload.get(
            "target_external_id"
        )
        if not isinstance(primary, str):
            raise _Later(self.settings.dependency_wait, "waiting for the survivor's create")
        client = self._client(peer)
        groups = (await self._home_call(self.home.schema())).endpoints.by_type.get(
            "Group", "/Groups"
        )
        patched: list[str] = []
        for group_id in await client.find_by(groups, "members.value", alias):
            answer = await client.call(
                "GET", f"{groups}/{group_id}", params={"attributes": "members"}
            )
            if answer.status == 404:
                continue
            if answer.status != 200 or not isinstance(answer.body, dict):
                raise judge(answer.status, answer.body, answer.headers, f"GET {groups}/...")
            values = {
                m.get("value") for m in answer.body.get("members") or [] if isinstance(m, dict)
            }
            if alias not in values:
                continue  # changed meanwhile (the group's own sync): a remove would match nothing
            ops: list[dict[str, Any]] = [
                {"op": "remove", "path": f"members[value eq {json.dumps(alias)}]"}
            ]
            if primary not in values:
                ops.append({"op": "add", "path": "members", "value": [{"value": primary}]})
            answer = await client.call(
                "PATCH", f"{groups}/{group_id}", body={"schemas": [PATCH_SCHEMA], "Operations": ops}
            )
            if answer.status not in (200, 204, 404):
                raise judge(answer.status, answer.body, answer.headers, f"PATCH {groups}/...")
            patched.append(group_id)
        # What the peer last received of the broker's own groups now names the primary.
        async with self.pool.acquire() as conn, conn.transaction():
            # The survivor and its account are held until this is recorded: a split handing the
            # account over meanwhile waits, then finds the copies naming it; one that handed it
            # over already leaves the groups naming another entity's account: synced again.
            moved = await self._copy_is_stale(
                conn, peer, claim.internal_id, {claim.internal_id: primary}
            )
            followed: list[str] = []
            for copy in await conn.fetch(query("copies_naming"), peer.id, alias):
                document = dict(copy["document"])
                members = [m for m in document.get("members", []) if m.get("value") != alias]
                if not any(m.get("value") == primary for m in members):
                    members.append({"value": primary})
                document["members"] = members
                await conn.execute(query("save_copy"), peer.id, copy["internal_id"], document, None)
                followed.append(copy["internal_id"])
            if patched:
                # A group of the broker's changed here whose copy named no alias: its own sync
                # recorded what it wrote meanwhile, which did not see this change.
                await conn.execute(query("resync_groups_moved"), peer.id, patched, followed)
            if moved and followed:
                await conn.execute(query("enqueue_sync_to"), peer.id, followed, datetime.now(UTC))

    async def _delete_alias(self, peer: Peer, claim: Claim) -> None:
        """DELETE the alias at the peer; on 2xx or 404 its row is retired (or removed)."""
        found = await self._alias_endpoint(peer, claim)
        if found is None:
            return
        alias, endpoint, _entity = found
        answer = await self._client(peer).call("DELETE", f"{endpoint}/{alias}")
        if answer.status not in (200, 204, 404):
            raise judge(answer.status, answer.body, answer.headers, f"DELETE {endpoint}/...")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(query("retire_alias"), peer.id, alias, self.settings.retention)
            # A group delivered while the memberships moved may name the alias still.
            await conn.execute(query("resync_groups_naming"), [peer.id], [alias])
            revived = await conn.fetchval(query("account_owner"), peer.id, alias)
            if revived is not None:
                # A split gave the alias back to an entity while its delete was on its way:
                # that entity finds it gone, and is created anew.
                await conn.execute(query("enqueue_sync_to"), peer.id, [revived], datetime.now(UTC))

    async def _undo_create(self, peer: Peer, claim: Claim) -> None:
        """A merge or split cancelled a create: whatever an earlier attempt made goes again."""
        handle = claim.payload.get("correlation_handle")
        schema = await self._home_call(self.home.schema())
        entity = await self.pool.fetchrow(query("entity_for_delivery"), peer.id, claim.internal_id)
        resource_type = entity["resource_type"] if entity is not None else "User"
        endpoint = schema.endpoints.by_type.get(resource_type)
        if not isinstance(handle, str) or endpoint is None:
            return
        client = self._client(peer)
        for made in await client.find_by(endpoint, "externalId", handle):
            if await self.pool.fetchval(query("mapped_account"), peer.id, made):
                continue  # it became some entity's account after all
            answer = await client.call("DELETE", f"{endpoint}/{made}")
            if answer.status not in (200, 204, 404):
                raise judge(answer.status, answer.body, answer.headers, f"DELETE {endpoint}/...")

    # ------------------------------------------------------------------ pushed SETs

    async def _push_set(self, peer: Peer, claim: Claim) -> None:
        """One SET to the domain's receiver (RFC 8935): 202 is delivered; a 400 with an error
        code is the receiver's refusal, kept with the SET and dead-lettered."""
        if self.events is None or peer.events_endpoint is None:
            raise Failure(
                Verdict.PERMANENT,
                f"domain {peer.id} no longer has its SETs pushed: "
                f"`broker events subscribe {peer.id} --delivery push --endpoint URL` resumes it",
                peer_fault=False,
            )
        event_id = int(claim.payload["event"])
        rendered = await self.events().render(peer.id, ids=[event_id])
        if not rendered:
            return  # out of the domain's scope, or settled already
        (event,) = rendered
        token = peer_credential(peer.events_credential)
        what = f"POST {peer.events_endpoint} (SET {event.jti})"
        try:
            answer = await exchange(
                self.session,
                "POST",
                peer.events_endpoint,
                auth={"Authorization": f"Bearer {token}"} if token else {},
                data=event.token.encode(),
                headers={"Content-Type": SET_TYPE, "Accept": "application/json"},
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Failure(
                Verdict.TRANSIENT,
                f"{what}: the receiver did not answer ({type(exc).__name__}); retrying until it does",
            ) from exc
        if answer.status in (200, 202, 204):
            await self.pool.execute(query("events_acknowledged"), peer.id, [event.jti])
            return
        body = answer.json_or_none()
        if answer.status == 400 and isinstance(body, dict) and isinstance(body.get("err"), str):
            error = {"err": body["err"], "description": body.get("description")}
            await self.pool.execute(query("event_failed"), peer.id, event_id, error)
            raise Failure(
                Verdict.PERMANENT,
                f"{what}: the receiver refused the SET: {body['err']}"
                + (f" ({body['description']})" if body.get("description") else "")
                + "; fix the receiver or the subscription, then retry the delivery",
                status=400,
                scim_error=error,
            )
        raise judge(answer.status, body, answer.headers, what)
