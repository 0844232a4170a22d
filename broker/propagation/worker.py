"""The delivery worker: claims outbox rows toward push peers and hands each to the part that
delivers its kind.

- ``claims``: the peers' lanes, the claim with its lease, the ledger that writes each outcome
  back (done, dead, later with its backoff, the peer's health), and the purge;
- ``sync``: a ``sync`` (or ``provision``) makes the peer's copy match home's state (create,
  update, deprovision);
- ``cleanup``: a merge's or split's clean-up (``move_memberships``, ``delete_alias``,
  ``undo_create``);
- ``pushed``: a pushed SET (``set``, RFC 8935);
- ``decisions``: what each of them decides, as pure functions.

This module keeps the loop: claim for every peer with room, start each delivery, dispatch it by
kind, and settle it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import aiohttp
import asyncpg

from broker.db import listening
from broker.events.render import EventRenderer
from broker.home import HomeClient
from broker.mapping.guard import LeakGuard
from broker.mapping.store import MappingStore
from broker.propagation.claims import Claimer, Lane, Ledger
from broker.propagation.cleanup import Cleanup
from broker.propagation.delivery import (
    Claim,
    Clock,
    Later,
    Peer,
    PeerClients,
    WorkerSettings,
)
from broker.propagation.policy import Failure, Verdict
from broker.propagation.pushed import SetPusher
from broker.propagation.sync import Syncer
from broker.propagation.tools import Tools
from broker.scim.guard import IdShape
from broker.secrets import SecretBox

__all__ = ["Deliverer", "Peer", "WorkerSettings"]

log = logging.getLogger(__name__)

Observer = Callable[[str, str], None]
"""Called with (peer, outcome) after each delivery: done, retry, dead, waiting."""


class Deliverer:
    """Delivers the outbox: ``run`` until cancelled, or ``drain`` until nothing is due.

    ``clock`` (epoch seconds) and ``monotonic`` are the worker's only clocks, for tests to
    control: ``clock`` for what is compared with the database's time (when a row is due, how
    long a 409 is retried, when a suspended account is deleted), ``monotonic`` for intervals
    here (lanes resting, a peer's health, home's reads shared, whether a peer takes PATCH, a
    drain's deadline). A ``Retry-After`` given as an HTTP date is read against the real time
    (``policy.retry_after_seconds``)."""

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
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self.pool = pool
        self.home = home
        self.session = session
        self.settings = settings or WorkerSettings()
        self.observe = observe or (lambda _peer, _outcome: None)
        self.worker_id = f"worker-{uuid.uuid4().hex[:8]}"
        self.monotonic = monotonic
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        guard = guard or LeakGuard(MappingStore(pool), IdShape(id_pattern))
        clients = PeerClients(
            session,
            self.settings.concurrency,
            monotonic=monotonic,
            limit=self.settings.max_answer,
            bulk=self.settings.bulk,
            guard=guard,
        )
        self.claims = Claimer(
            pool,
            self.settings,
            self.worker_id,
            wake=self._wake.set,
            monotonic=monotonic,
            takes_bulk=clients.takes_bulk,
        )
        self.ledger = Ledger(
            pool,
            self.settings,
            self.worker_id,
            clock=clock,
            monotonic=monotonic,
            forget_peers=self.claims.forget_peers,
        )
        tools = Tools(
            pool,
            home,
            clients,
            self.ledger,
            self.settings,
            clock,
            monotonic,
        )
        self.syncs = Syncer(tools, guard=guard, box=box)
        self.cleanup = Cleanup(tools)
        self.sets = SetPusher(pool, session, events, limit=self.settings.max_answer)

    # ------------------------------------------------------------------ the loop

    async def run(self, listen_url: str | None = None) -> None:
        """Deliver until cancelled; woken by NOTIFY on ``broker_outbox`` when ``listen_url`` is
        given, and every ``idle_check`` seconds regardless."""
        purging = asyncio.create_task(self.claims.purging(), name="outbox purge")
        async with self._listening(listen_url):
            try:
                while True:
                    self._wake.clear()
                    try:
                        await self.claim_and_start()
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                        log.warning("delivery worker cannot reach the database: %s", exc)
                    # Not wait_for: in Python 3.11 it drops a cancel that comes with a wake-up.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.settings.idle_check):
                            await self._wake.wait()
            finally:
                purging.cancel()
                self.claims.close()
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(purging, *self._tasks, return_exceptions=True)
                await self.syncs.starts.finished()
                await self.syncs.writes.recorder.finished()

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
        self.claims.enqueued = True
        self._wake.set()

    async def claim_and_start(self) -> int:
        """Claim what is due for every peer with room, and start delivering it. The deliveries
        start once every peer's claim is in, so that one read of home serves the deliveries of
        one change to all of them (see ``HomeReads``)."""
        claimed: list[tuple[Peer, Claim, Lane]] = []
        try:
            await self.claims.claim(claimed)
        finally:
            for peer, claim, lane in claimed:
                task = asyncio.create_task(self._deliver(peer, claim, lane))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return len(claimed)

    async def purge(self, batch: int = 5000) -> int:
        """Delete finished deliveries older than ``done_retention`` (see ``Claimer.purge``)."""
        return await self.claims.purge(batch)

    async def drain(self, within: float = 30.0) -> None:
        """Deliver until nothing is due or in flight here (for tests and one-shot commands)."""
        deadline = self.monotonic() + within
        self.claims.forget_peers()
        while self.monotonic() < deadline:
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

    async def _deliver(self, peer: Peer, claim: Claim, lane: Lane) -> None:
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
                await self.ledger.failed(peer, claim, lane, failure)
        finally:
            self.ledger.settled.discard(claim.id)
            lane.finished(claim)
            self._wake.set()

    async def _attempt(self, peer: Peer, claim: Claim, lane: Lane) -> str:
        try:
            await self._perform(peer, claim)
        except Later as later:
            return await self.ledger.later(claim, later, self._wake.set)
        except Failure as failure:
            return await self.ledger.failed(peer, claim, lane, failure)
        return await self.ledger.succeeded(peer, claim, lane)

    async def _perform(self, peer: Peer, claim: Claim) -> None:
        """Deliver the claim as its kind says."""
        if claim.kind in ("sync", "provision"):
            await self.syncs.sync(peer, claim)
        elif claim.kind == "move_memberships":
            await self.cleanup.move_memberships(peer, claim)
        elif claim.kind == "delete_alias":
            await self.cleanup.delete_alias(peer, claim)
        elif claim.kind == "undo_create":
            await self.cleanup.undo_create(peer, claim)
        elif claim.kind == "delete_orphan":
            await self.cleanup.delete_orphan(peer, claim)
        elif claim.kind == "set":
            await self.sets.push(peer, claim)
        else:
            raise Failure(
                Verdict.PERMANENT,
                f"this broker does not know deliveries of kind {claim.kind!r}: upgrade it",
                peer_fault=False,
            )
