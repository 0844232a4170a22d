"""Which outbox rows this worker takes, and what became of them: the peers' lanes, the claim
with its lease, the ledger that writes a delivery's outcome back under that lease (done, dead,
later with its backoff, and the peer's health), and the purge of finished rows.

Rows are claimed with ``FOR UPDATE SKIP LOCKED`` and a lease; a row is claimed only when no
older unfinished row of the same (peer, entity) exists, so order per entity holds across
processes while different entities proceed in parallel, bounded per peer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg

from broker.db import query
from broker.propagation.decisions import claim_room, health_due, peers_reread, ride_room
from broker.propagation.delivery import Claim, Clock, Later, Peer, WorkerSettings, utc
from broker.propagation.policy import Failure, Verdict

if TYPE_CHECKING:
    from broker.db import Connection

__all__ = ["Claimer", "Lane", "Ledger"]

DONE = "deliveries_done"
"""The statement that settles deliveries as done (with their entities' history rows)."""

log = logging.getLogger(__name__)


@dataclass
class Lane:
    """One peer's share of this worker: how many of its deliveries are in flight, and until when
    it rests after a failure the peer caused."""

    active: int = 0
    """Deliveries under way, those taken along included."""
    riding: int = 0
    """Of which taken along with other lanes' claims (``ride_room``)."""
    paused_until: float = 0.0
    healthy_at: float = 0.0
    """When a success here last told the database the peer is healthy (it says so at most once
    a second while nothing fails)."""

    def took(self, claim: Claim) -> None:
        self.active += 1
        self.riding += claim.ride

    def finished(self, claim: Claim) -> None:
        self.active -= 1
        self.riding -= claim.ride


class Claimer:
    """Claims what is due for every peer with room in its lane; reads the peers to deliver to;
    purges finished rows."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: WorkerSettings,
        worker_id: str,
        *,
        wake: Callable[[], None],
        monotonic: Clock,
        takes_bulk: Callable[[str], bool] = lambda _peer_id: False,
    ) -> None:
        self.pool = pool
        self.takes_bulk = takes_bulk
        """Whether a peer (by ID) takes the writes in Bulk requests now: its lane holds more
        deliveries under way (``claim_room``)."""
        self.settings = settings
        self.worker_id = worker_id
        self.wake = wake
        self.monotonic = monotonic
        self.lanes: dict[str, Lane] = {}
        self._peers: tuple[float, list[Peer]] = (0.0, [])
        self.enqueued = False
        """A NOTIFY said something was enqueued since the peers were read (perhaps for a new
        peer)."""
        self._recheck: asyncio.TimerHandle | None = None

    def forget_peers(self) -> None:
        """Read the peers again at the next claim (a peer's health changed)."""
        self._peers = (0.0, [])

    def close(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()

    async def claim(self, claimed: list[tuple[Peer, Claim, Lane]]) -> None:
        """Append to ``claimed`` what is due for every peer with room (as it comes, so that a
        failure part way leaves what was claimed to be started), then what the other lanes
        take along: the same entities' deliveries toward them (``ride``)."""
        now = self.monotonic()
        peers = await self.push_peers(now)
        for peer in peers:
            lane = self.lanes.setdefault(peer.id, Lane())
            room = claim_room(
                concurrency=self.settings.concurrency,
                active=lane.active - lane.riding,
                quarantined=peer.status == "quarantined",
                paused_until=lane.paused_until,
                now=now,
                bulk=self.takes_bulk(peer.id),
            )
            if room <= 0:
                continue
            records = await self.pool.fetch(
                query("claim_deliveries"), peer.id, self.worker_id, room, self.settings.lease
            )
            claimed_at = self.monotonic()
            for record in records:
                claim = Claim.from_record(record, claimed_at)
                lane.took(claim)
                claimed.append((peer, claim, lane))
        if len(peers) > 1:
            await self.ride(peers, claimed, now)

    async def ride(
        self, peers: list[Peer], claimed: list[tuple[Peer, Claim, Lane]], now: float
    ) -> None:
        """Claim, toward the other peers, the deliveries of the entities just claimed (syncs and
        provisions: they read home), in one statement: their deliveries start together, and one
        read of home serves them all. Without this, lanes that drift apart by a few rows read
        home once per peer for every change."""
        entities = sorted({c.internal_id for _, c, _ in claimed if c.kind in ("sync", "provision")})
        if not entities:
            return
        rooms: dict[str, int] = {}
        by_id: dict[str, Peer] = {}
        for peer in peers:
            if peer.scim_url is None:
                continue
            lane = self.lanes.setdefault(peer.id, Lane())
            room = ride_room(
                concurrency=self.settings.concurrency,
                riding=lane.riding,
                quarantined=peer.status == "quarantined",
                paused_until=lane.paused_until,
                now=now,
                bulk=self.takes_bulk(peer.id),
            )
            if room > 0:
                rooms[peer.id] = room
                by_id[peer.id] = peer
        if not rooms:
            return
        records = await self.pool.fetch(
            query("claim_riders"),
            list(rooms),
            entities,
            list(rooms.values()),
            self.worker_id,
            self.settings.lease,
        )
        claimed_at = self.monotonic()
        for record in records:
            peer = by_id[record["domain_id"]]
            lane = self.lanes[peer.id]
            claim = Claim.from_record(record, claimed_at, ride=True)
            lane.took(claim)
            claimed.append((peer, claim, lane))

    async def push_peers(self, now: float) -> list[Peer]:
        """The peers to deliver to. Every finished delivery and every enqueue wakes the loop:
        the list is read again once a second, after a peer's health changed here, and on an
        enqueue (which may be the first for a new peer) at most every 50 ms."""
        read_at, peers = self._peers
        due = peers_reread(now=now, read_at=read_at, enqueued=self.enqueued)
        if due == 0.0:
            self.enqueued = False
            peers = [Peer.from_record(r) for r in await self.pool.fetch(query("push_peers"))]
            self._peers = (now, peers)
        elif due is not None and self._recheck is None:
            # Woken too soon to read again: look once the 50 ms are over, not at the next
            # idle check (the enqueue may be the first for a new peer).
            def recheck() -> None:
                self._recheck = None
                self.wake()

            self._recheck = asyncio.get_running_loop().call_later(due, recheck)
        return peers

    async def purging(self) -> None:
        """Purge every ``purge_every`` seconds, beside the deliveries (a first purge of a large
        history takes a while, and claims go on meanwhile)."""
        while True:
            await asyncio.sleep(self.settings.purge_every)
            try:
                await self.purge()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("the outbox purge cannot reach the database: %s", exc)

    async def purge(self, batch: int = 5000) -> int:
        """Delete finished deliveries older than ``done_retention``, and entity history older
        than ``history_retention`` (each on its own clock), a batch per statement so that no
        transaction holds many rows; returns how many deliveries went."""
        history = await self._purge("purge_history", self.settings.history_retention, batch)
        if history:
            log.info(
                "purged %d history rows older than %gs", history, self.settings.history_retention
            )
        purged = await self._purge("purge_finished", self.settings.done_retention, batch)
        if purged:
            log.info(
                "purged %d finished deliveries older than %gs", purged, self.settings.done_retention
            )
        return purged

    async def _purge(self, statement: str, retention: float, batch: int) -> int:
        if retention <= 0:
            return 0
        purged = 0
        while True:
            status = await self.pool.execute(query(statement), retention, batch)
            deleted = int(status.split()[-1])
            purged += deleted
            if deleted < batch:
                return purged


class Ledger:
    """Writes what became of a claimed delivery back to its row, under the worker's lease: done
    (with its operation's progress), dead, or pending again (later, or after a failure with its
    backoff); and the peer's health that a success or a failure tells."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: WorkerSettings,
        worker_id: str,
        *,
        clock: Clock,
        monotonic: Clock,
        forget_peers: Callable[[], None],
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.worker_id = worker_id
        self.clock = clock
        self.monotonic = monotonic
        self.forget_peers = forget_peers
        self.settled: set[int] = set()
        """Deliveries already settled as done in the transaction that recorded their effect."""

    async def succeeded(self, peer: Peer, claim: Claim, lane: Lane) -> str:
        """The delivery is done; the peer is healthy (told at most once a second)."""
        if claim.id not in self.settled:
            await self.settle(claim, DONE)
        now = self.monotonic()
        if not health_due(now=now, healthy_at=lane.healthy_at):
            return "done"  # the database heard so less than a second ago, and nothing failed since
        lane.healthy_at = now
        recovered = await self.pool.fetchval(query("domain_delivered"), peer.id)
        if recovered:
            log.info("peer %s recovered: its queue drains now", peer.id)
            await self.pool.execute(query("release_queue"), peer.id)
            lane.paused_until = 0.0
            self.forget_peers()
        return "done"

    async def later(self, claim: Claim, later: Later, wake: Callable[[], None]) -> str:
        """Not yet: pending again after ``later.delay`` seconds, not counted as an attempt."""
        due = utc(self.clock) + timedelta(seconds=later.delay)
        if later.delay < self.settings.idle_check:
            # A rescheduled row sends no notification: look again when it is due.
            asyncio.get_running_loop().call_later(later.delay, wake)
        await self.reschedule(
            claim, due, counted=False, record={"verdict": "waiting", "reason": str(later)}
        )
        return "waiting"

    async def failed(self, peer: Peer, claim: Claim, lane: Lane, failure: Failure) -> str:
        """Dead-lettered (permanent), or tried again after its backoff; a failure the peer
        caused marks it failing (quarantined past ``quarantine_after``) and rests its lane."""
        record = failure.record()
        if failure.verdict is Verdict.PERMANENT:
            log.warning("delivery %s to %s dead-lettered: %s", claim.id, peer.id, failure.reason)
            await self.settle(claim, "delivery_dead", record)
            return "dead"
        quarantined = peer.status == "quarantined"
        if failure.peer_fault:
            lane.healthy_at = 0.0
            quarantined = await self._failing(peer) or quarantined
        delay = self.settings.backoff.delay(
            claim.attempts, retry_after=failure.retry_after, quarantined=quarantined
        )
        if failure.peer_fault:
            lane.paused_until = self.monotonic() + delay
        log.info(
            "delivery %s to %s failed (attempt %d), retrying in %.1fs: %s",
            claim.id,
            peer.id,
            claim.attempts + 1,
            delay,
            failure.reason,
        )
        due = utc(self.clock) + timedelta(seconds=delay)
        await self.reschedule(claim, due, counted=True, record=record)
        return "retry"

    async def _failing(self, peer: Peer) -> bool:
        """The peer is failing: whether it is quarantined now (logged when it just became so)."""
        health = await self.pool.fetchrow(
            query("domain_failed"), peer.id, self.settings.quarantine_after
        )
        if health is None or health["status"] != "quarantined":
            return False
        if peer.status != "quarantined":
            log.warning("peer %s quarantined: failing since %s", peer.id, health["failing_since"])
            self.forget_peers()
        return True

    async def settle(self, claim: Claim, statement: str, *args: Any) -> None:
        """The delivery done or dead, and its operation's progress with it (one transaction, so
        that a crash in between cannot leave an operation propagating for ever)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self.settle_on(conn, claim, statement, *args)

    async def done_with(self, conn: Connection, claim: Claim) -> None:
        """Settle the delivery as done in the caller's transaction, the one that records what it
        did (one commit instead of two). A merge's or split's delivery settles on its own,
        after, since its operation's row is locked only after what the record locks."""
        if claim.operation_id is None:
            await self.settle_on(conn, claim, DONE)
            self.settled.add(claim.id)

    async def done_all(self, conn: Connection, claims: list[Claim]) -> None:
        """Settle several deliveries as done in the caller's transaction (one statement); none
        belongs to a merge or split (see ``done_with``)."""
        assert all(claim.operation_id is None for claim in claims)
        if not claims:
            return
        await conn.execute(query(DONE), [c.id for c in claims], self.worker_id)
        self.settled.update(c.id for c in claims)

    def now(self) -> datetime:
        """The wall clock's time, as the database compares it."""
        return utc(self.clock)

    async def settle_on(self, conn: Connection, claim: Claim, statement: str, *args: Any) -> None:
        if claim.operation_id is not None:
            # Settles of one operation's deliveries queue here, so each progress is computed
            # from what the others committed (a later statement sees them).
            await conn.execute(query("lock_operation"), claim.operation_id)
        # Done is one statement for one delivery or several (an array of IDs).
        first = [claim.id] if statement == DONE else claim.id
        await conn.execute(query(statement), first, self.worker_id, *args)
        if claim.operation_id is not None:
            await conn.execute(query("refresh_operation"), claim.operation_id)

    async def reschedule(
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
