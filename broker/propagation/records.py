"""What several finished deliveries did, recorded in one transaction: the account a create made
(the mapping row finished), the copy the peer received, and the delivery settled as done, for
every delivery that finished while the previous batch was being written.

A delivery's record and its settle still commit together (they are in the same transaction), and
each is what ``Writes`` records alone: the entities are share-locked first (one statement, in
order), then the creates are finished, the copies saved and the deliveries settled, one statement
each for the whole batch. Only the plain case is batched: a delivery that names other entities
(whose references must be checked), or that belongs to a merge or a split (whose operation row is
locked after), records alone. If the batch fails (an account mapped to another entity already,
say: then nothing of it was written), each delivery records alone, as before, so that one
delivery's failure is its own; every one of these writes can be made twice."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import asyncpg
import orjson

from broker.db import query
from broker.mapping import accounts
from broker.propagation.decisions import copy_outcome
from broker.propagation.delivery import Claim

if TYPE_CHECKING:
    from broker.db import Connection
    from broker.propagation.claims import Ledger

__all__ = ["Batcher", "Record", "Recorder", "batchable"]

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

_BATCH = 64
"""At most this many deliveries recorded in one transaction."""
_WRITERS = 2
"""At most this many batches written at once."""
_SECOND = 32
"""A second batch starts while one is being written only once this many items wait: fewer wait
for it (one transaction each costs more than the wait)."""


@dataclass
class Record:
    """What one delivery wrote to its peer, to record: a create (``account`` is the peer's new
    ID) or an update (``account`` is the ID written to, ``version`` the copy it was computed
    from)."""

    peer_id: str
    claim: Claim
    desired: Mapping[str, Any]
    """What the peer received (without write-only values)."""
    alone: Callable[[], Awaitable[Any]]
    """Records this delivery in a transaction of its own (the path a failed batch falls back
    to); its result is the record's."""
    created: bool
    account: str
    handle: str | None = None
    """A create's correlation handle (its pending row is found by it)."""
    linked: bool = False
    """The create linked to the peer's own account (settled even if the create was cancelled)."""
    version: int | None = None
    """An update's copy version (None: there was no copy)."""


def _json(document: Mapping[str, Any]) -> str:
    """The document as JSON text for a jsonb column (orjson; what it cannot encode, such as an
    integer past 64 bits, the standard library does, as the connection's codec would)."""
    try:
        return orjson.dumps(document).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(document)


async def _record_alone(record: Record) -> Any:
    return await record.alone()


def batchable(claim: Claim, views: Mapping[str, str]) -> bool:
    """Whether a delivery records in a batch: it names no other entity (nothing to check for a
    reference that moved) and belongs to no merge or split (whose settle locks its operation)."""
    return not views and claim.operation_id is None


class Batcher(Generic[T, R]):
    """Items submitted while a batch is being written make the next batch: ``together`` writes a
    batch (its results in order); if it fails in PostgreSQL, nothing of it was written and
    ``alone`` writes each item by itself, so that one item's failure stays its own. A second
    batch is written beside the first once ``_SECOND`` items wait for it (``_WRITERS`` at
    most): a transaction's commit (and its WAL flush) no longer holds up every delivery that
    finishes meanwhile."""

    def __init__(
        self,
        together: Callable[[list[T]], Awaitable[list[R]]],
        alone: Callable[[T], Awaitable[R]],
        *,
        what: str,
    ) -> None:
        self.together = together
        self.alone = alone
        self.what = what
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._writing: set[asyncio.Task[None]] = set()
        self.batches = 0
        """Batches written together so far (with ``items``: how well they batch)."""
        self.items = 0
        """Items written in them."""

    async def submit(self, item: T) -> R:
        """Write ``item`` with the others submitted now; what ``alone`` would return."""
        result: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, result))
        if not self._writing or (len(self._writing) < _WRITERS and len(self._waiting) >= _SECOND):
            self._writing.add(asyncio.create_task(self._write_all()))
        return await asyncio.shield(result)

    async def finished(self) -> None:
        """Until the batches being written (and those waiting) are written: what a stopping
        worker awaits, so that no transaction is left half-way when its pool closes."""
        while self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)

    async def _write_all(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:_BATCH], self._waiting[_BATCH:]
                await self._write(batch)
        finally:
            # Here, not in a done callback: an item submitted once the loop saw none waiting
            # must find no writer, and start one.
            task = asyncio.current_task()
            assert task is not None
            self._writing.discard(task)

    async def _write(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self.together([item for item, _ in batch])
        except Exception as exc:
            # Whatever failed (a constraint, a value that cannot be encoded, the connection),
            # each item is written by itself: its own failure is its own, and every write here
            # can be made again (a finished create is found by its account, a copy by its
            # version, a settle by its state).
            log.info("%d %s written one by one: %s", len(batch), self.what, type(exc).__name__)
            await asyncio.gather(*(self._alone(item, result) for item, result in batch))
            return
        except BaseException as exc:
            for _, result in batch:
                if not result.done():
                    result.set_exception(exc)
                    result.exception()  # retrieved: its submitter raises it
            raise
        self.batches += 1
        self.items += len(batch)
        for (_, result), value in zip(batch, results, strict=True):
            result.set_result(value)

    async def _alone(self, item: T, result: asyncio.Future[R]) -> None:
        try:
            result.set_result(await self.alone(item))
        except Exception as exc:
            result.set_exception(exc)
            result.exception()


class Recorder:
    """Collects finished deliveries and records them in batches, one transaction each; one batch
    is written at a time, and the deliveries finishing meanwhile make the next."""

    def __init__(self, pool: asyncpg.Pool, ledger: Ledger) -> None:
        self.pool = pool
        self.ledger = ledger
        self.batcher: Batcher[Record, Any] = Batcher(
            self._in_one_transaction, _record_alone, what="deliveries recorded"
        )

    async def record(self, record: Record) -> Any:
        """Record the delivery with the others finishing now; what ``alone`` would return (for
        a create: the entity the account belongs to, None when a merge cancelled it)."""
        return await self.batcher.submit(record)

    async def finished(self) -> None:
        """See ``Batcher.finished``."""
        await self.batcher.finished()

    async def _in_one_transaction(self, batch: list[Record]) -> list[Any]:
        creates = [r for r in batch if r.created]
        updates = [r for r in batch if not r.created]
        async with self.pool.acquire() as conn, conn.transaction():
            # Share-locked in one statement, in order: a merge or split of them finishes first.
            await conn.execute(
                query("share_entities"), sorted({r.claim.internal_id for r in batch})
            )
            owners = await self._finish_creates(conn, creates)
            await self._save_copies_of(conn, updates)
            settled = [
                r.claim for r in batch if not r.created or owners[id(r)] is not None or r.linked
            ]
            await self.ledger.done_all(conn, settled)
        return [owners.get(id(r)) for r in batch]

    async def _finish_creates(self, conn: Connection, creates: list[Record]) -> dict[int, Any]:
        """The creates' rows finished (``finish_create``), and the copies of those still wanted
        saved; the owner of each (by ``id`` of its record)."""
        if not creates:
            return {}
        found = await accounts.finish_creates(
            conn, [(r.handle or "", r.peer_id, r.account) for r in creates]
        )
        owners = {id(r): owner for r, owner in zip(creates, found, strict=True)}
        kept = [r for r in creates if owners[id(r)] is not None]
        if kept:
            await conn.execute(
                query("save_copies"),
                [r.peer_id for r in kept],
                [owners[id(r)] for r in kept],
                [_json(r.desired) for r in kept],
            )
        return owners

    async def _save_copies_of(self, conn: Connection, updates: list[Record]) -> None:
        """The updates' copies saved where they are still the ones the writes were computed
        from (``save_copy_of``); where not, the copy goes and the entity is synced again."""
        if not updates:
            return
        changed = await conn.fetch(
            query("save_copies_of"),
            [r.peer_id for r in updates],
            [r.claim.internal_id for r in updates],
            [_json(r.desired) for r in updates],
            [r.account for r in updates],
            [r.version for r in updates],
        )
        for row in changed:
            drop, resync = copy_outcome(stale=False, recorded=False)
            if drop:
                await conn.execute(query("drop_copy"), row["domain_id"], row["internal_id"])
            if resync:
                await conn.execute(
                    query("enqueue_sync_to"),
                    row["domain_id"],
                    [row["internal_id"]],
                    self.ledger.now(),
                )
