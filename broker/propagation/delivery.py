"""What the delivery worker's parts share: its settings, a peer and a claimed delivery as values,
the clocks, the peers' SCIM clients, and the steps every kind of delivery takes (a call to home,
the check that a reference a delivery sent still holds)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import asyncpg

from broker.db import query
from broker.home import HomeRefused, HomeUnavailable
from broker.mapping.guard import LeakGuard
from broker.propagation.peer import BULK_OPERATIONS, MAX_ANSWER, PeerClient, peer_credential
from broker.propagation.policy import Backoff, Failure, Verdict

if TYPE_CHECKING:
    from broker.db import Connection

__all__ = [
    "Claim",
    "Clock",
    "Later",
    "Peer",
    "PeerClients",
    "WorkerSettings",
    "copy_is_stale",
    "home_call",
    "utc",
]

T = TypeVar("T")

Clock = Callable[[], float]
"""Seconds: ``time.time`` (epoch) or ``time.monotonic``, or a test's."""


def utc(clock: Clock) -> datetime:
    """The wall clock's time as an aware datetime (what the database compares with)."""
    return datetime.fromtimestamp(clock(), UTC)


def worker_pool_size(concurrency: int) -> int:
    """Connections of the delivery workers' pool in one process (``broker serve``). A
    delivery holds one only for a statement or a recording batch, never while it waits for a
    peer, so the pool does not grow with the peers: twice ``concurrency`` and four more (for
    the claims and the loop). A pool of ``concurrency`` per peer, as large as it gets with
    five peers, drained the outbox 3 to 5% faster (issue 15), not worth the connections."""
    return 2 * concurrency + 4


@dataclass(frozen=True)
class WorkerSettings:
    concurrency: int = 4
    """Requests in flight at each peer, per process. Up to twice as many deliveries are under
    way there, so that while ``concurrency`` of them wait for the peer the others read home and
    the database: the peer's speed, not the broker's steps around each request, sets the pace.
    As many more may be taken along with other lanes' claims (``decisions.ride_room``): three
    rounds of ``peer_timeout`` at most, within a claim's ``lease``."""
    lease: float = 120.0
    backoff: Backoff = field(default_factory=Backoff)
    quarantine_after: float = 300.0
    retention: float = 30 * 86400.0
    done_retention: float = 7 * 86400.0
    """Seconds a finished delivery is kept before the purge deletes it (0: kept for ever)."""
    history_retention: float = 30 * 86400.0
    """Seconds each entity's history is kept, independent of the outbox (0: kept for ever)."""
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
    max_answer: int = MAX_ANSWER
    """The longest answer read from a peer or a SET receiver, in bytes; a longer one is left
    unread and the delivery fails (``policy.too_large``)."""
    bulk: int = BULK_OPERATIONS
    """The most writes sent to a peer in one SCIM Bulk request, for a peer whose
    ServiceProviderConfig says it takes Bulk (``peer.PeerClient``); 0 or 1: never Bulk."""


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
    """sync (or provision: the same, for a split-off), move_memberships, delete_alias,
    undo_create, delete_orphan (an account of no entity: ``internal_id`` is empty), set."""
    payload: Mapping[str, Any] = field(default_factory=dict)
    operation_id: uuid.UUID | None = None
    """The merge or split the delivery belongs to, whose progress it updates."""
    conflict_since: float | None = None
    """When (epoch seconds) the peer first refused this delivery with 409, if it did."""
    claimed_at: float = float("inf")
    """When (monotonic) the claim came back: every write the delivery stands for was in home
    before then (a write folds into a sync only while it waits). Unknown (the default): no
    earlier read of home is fresh enough, and the delivery reads its own."""
    entity: Mapping[str, Any] | None = None
    """What ``entity_for_delivery`` reads (the entity, its primary row in the peer, the peer's
    copy), read with the claim itself; None: not read (the delivery reads it)."""
    ride: bool = False
    """Claimed along with another lane's claim of the same entity (``Claimer.ride``)."""

    @classmethod
    def from_record(cls, record: asyncpg.Record, claimed_at: float, *, ride: bool = False) -> Claim:
        return cls(
            record["id"],
            record["internal_id"] or "",  # none: an orphan account (delete_orphan)
            record["attempts"],
            record["sealed_values"],
            record["kind"],
            record["payload"] or {},
            record["operation_id"],
            (record["last_error"] or {}).get("conflict_since"),
            claimed_at,
            _entity(record),
            ride,
        )


_ENTITY_COLUMNS = (
    "internal_id",
    "resource_type",
    "merged_into",
    "provision_on_demand",
    "known_here",
    "external_id",
    "mapping_state",
    "correlation_handle",
    "copy",
    "copy_version",
    "suspended_at",
)


def _entity(record: asyncpg.Record) -> dict[str, Any] | None:
    """The columns of ``entity_for_delivery`` a claim read with its row, if it read them (None
    also when the entity is not recorded)."""
    keys = record.keys()
    if "entity_state" not in keys or record["resource_type"] is None:
        return None
    entity = {column: record[column] for column in _ENTITY_COLUMNS}
    entity["state"] = record["entity_state"]
    return entity


class Later(Exception):
    """Not yet: look again after ``delay`` seconds (not a failure, not an attempt)."""

    def __init__(self, delay: float, reason: str) -> None:
        super().__init__(reason)
        self.delay = delay


async def home_call(awaitable: Awaitable[T]) -> T:
    """A call to home; home unreachable or refusing is a transient failure, not the peer's."""
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


async def copy_is_stale(
    conn: Connection, peer_id: str, internal_id: str, views: Mapping[str, str]
) -> bool:
    """Before a delivery records what it wrote to the peer (on the caller's transaction): hold
    what that copy depends on until it commits, and say whether a reference it sent (``views``:
    entity -> the peer's ID, as translated before the write) is stale already.

    The entity and the entities it names are share-locked: a merge or split of them (which locks
    them first) finishes before, and the copy is then recorded against its result, or waits, and
    then finds the copy (to drop it, or to resync the groups naming an account it moved). The
    named accounts' rows are share-locked too, for the same reason: a deprovision or an alias's
    delete retires them. A reference that translates to another account now (merged, handed
    over, retired while the write was on its way) makes the copy stale: the caller syncs the
    entity again."""
    await conn.execute(query("share_entities"), sorted({internal_id, *views}))
    if not views:
        return False
    await conn.execute(query("share_accounts"), peer_id, sorted(set(views.values())))
    return bool(
        await conn.fetchval(query("references_moved"), peer_id, list(views), list(views.values()))
    )


class PeerClients:
    """One SCIM client per peer over the worker's session, made again when the peer's URL or
    token changes; a peer's clients share its ``concurrency`` request slots."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        concurrency: int,
        *,
        monotonic: Clock,
        limit: int = MAX_ANSWER,
        bulk: int = BULK_OPERATIONS,
        guard: LeakGuard | None = None,
    ) -> None:
        self.session = session
        self.guard = guard
        self.limit = limit
        self.bulk = bulk
        self.concurrency = concurrency
        self.monotonic = monotonic
        self._clients: dict[str, PeerClient] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        """Per peer: its requests in flight from here (``concurrency`` at most)."""

    def takes_bulk(self, peer_id: str) -> bool:
        """Whether the writes to this peer go in Bulk requests now (``PeerClient.takes_bulk``;
        False for a peer not called yet)."""
        client = self._clients.get(peer_id)
        return client is not None and client.takes_bulk()

    def __call__(self, peer: Peer) -> PeerClient:
        assert peer.scim_url is not None, "only push peers get SCIM deliveries"
        client = self._clients.get(peer.id)
        token = peer_credential(peer.credential_ref)
        if client is None or client.base_url != peer.scim_url.rstrip("/") or client.token != token:
            slots = self._slots.setdefault(peer.id, asyncio.Semaphore(self.concurrency))
            client = PeerClient(
                self.session,
                peer.scim_url,
                token,
                domain=peer.id,
                slots=slots,
                monotonic=self.monotonic,
                limit=self.limit,
                bulk=self.bulk,
                guard=self.guard,
            )
            self._clients[peer.id] = client
        return client
