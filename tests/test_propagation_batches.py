"""Deliveries that finish together are recorded together (``broker/propagation/records.py``): one
transaction for the mapping rows, the copies and the settles of all of them, each exactly what it
would have recorded alone; a batch that fails in PostgreSQL is recorded one by one, so that one
delivery's failure stays its own. Against the real PostgreSQL, through the worker's own ``Writes``
(no peer is called: recording is what happens after the peer answered). And the claim, which
must stay a look-up by key under any plan PostgreSQL picks for it."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import pytest

from broker.db import query
from broker.domains import DomainStore
from broker.mapping import accounts
from broker.propagation.claims import Ledger
from broker.propagation.delivery import Claim, Peer, PeerClients, WorkerSettings
from broker.propagation.policy import Failure, Verdict
from broker.propagation.sync import Syncer, Write, Writes
from broker.propagation.tools import Tools
from tests.conftest import QueryCounter
from tests.waiting import until

WORKER = "w-test"
PEER = Peer(
    id="P1",
    scim_url="http://127.0.0.1:9/v2",
    credential_ref=None,
    scope_filter=None,
    readable=None,
    status="active",
    deprovision="delete",
    suspend_for=timedelta(days=30),
    on_conflict="dead-letter",
)


def _writes(pool: asyncpg.Pool) -> Writes:
    settings = WorkerSettings()
    ledger = Ledger(
        pool,
        settings,
        WORKER,
        clock=time.time,
        monotonic=time.monotonic,
        forget_peers=lambda: None,
    )
    # Recording never calls home or the peer.
    tools = Tools(
        pool, cast(Any, None), cast(PeerClients, None), ledger, settings, time.time, time.monotonic
    )
    return Writes(tools)


async def _entity_with_pending_create(pool: asyncpg.Pool) -> tuple[str, str, int]:
    """An entity with a create begun in P1 and its delivery claimed: (internal ID, handle,
    delivery)."""
    internal_id = uuid.uuid4().hex
    async with pool.acquire() as conn, conn.transaction():
        await accounts.record_entities(conn, [internal_id], ["User"])
    handle = await accounts.begin_create(pool, internal_id, "P1", f"h-{uuid.uuid4().hex[:12]}")
    assert handle is not None
    delivery: int = await pool.fetchval(
        "INSERT INTO outbox (domain_id, internal_id, kind, state, claimed_by, lease_until) "
        "VALUES ('P1', $1, 'sync', 'in_flight', $2, now() + interval '1 minute') RETURNING id",
        internal_id,
        WORKER,
    )
    return internal_id, handle, delivery


def _write(internal_id: str, handle: str, delivery: int, **desired: Any) -> Write:
    return Write(
        PEER,
        cast(Any, None),
        Claim(delivery, internal_id, 0, None),
        "/Users",
        "User",
        {"userName": f"u-{internal_id[:8]}", "externalId": handle, **desired},
        {},
        {},
    )


@pytest.fixture
async def p1(counted_pool: tuple[asyncpg.Pool, QueryCounter]) -> tuple[asyncpg.Pool, QueryCounter]:
    pool, counter = counted_pool
    await DomainStore(pool).add("P1", scim_url=PEER.scim_url, push=True)
    return pool, counter


async def test_creates_finishing_together_are_recorded_and_settled_in_one_transaction(
    p1: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    pool, counter = p1
    writes = _writes(pool)
    made = [await _entity_with_pending_create(pool) for _ in range(3)]
    await counter.clear()
    owners = await asyncio.gather(
        *(
            writes._record_create(_write(i, h, d), f"acct-{n}", False)
            for n, (i, h, d) in enumerate(made)
        )
    )
    assert owners == [i for i, _, _ in made]
    begins = [q for q in (await counter.sent()) if q.strip().upper().startswith("BEGIN")]
    assert len(begins) == 1, await counter.sent()
    for n, (internal_id, handle, delivery) in enumerate(made):
        row = await pool.fetchrow(
            "SELECT external_id, state FROM id_mappings WHERE correlation_handle = $1", handle
        )
        assert (row["external_id"], row["state"]) == (f"acct-{n}", "active")
        copy = await pool.fetchval(
            "SELECT document FROM peer_copies WHERE domain_id = 'P1' AND internal_id = $1",
            internal_id,
        )
        assert copy == {"userName": f"u-{internal_id[:8]}", "externalId": handle}
        state = await pool.fetchval("SELECT state FROM outbox WHERE id = $1", delivery)
        assert state == "done"
        assert delivery in writes.ledger.settled
        # Each delivery of the batch is in its entity's history, as a delivery settled alone is.
        history = await pool.fetchval(
            "SELECT status FROM entity_history WHERE internal_id = $1 AND kind = 'delivery' "
            "AND (details ->> 'delivery')::bigint = $2",
            internal_id,
            delivery,
        )
        assert history == "done"


async def test_a_create_whose_account_is_mapped_already_fails_alone_and_the_others_are_recorded(
    p1: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    pool, _ = p1
    writes = _writes(pool)
    first, clash, other = [await _entity_with_pending_create(pool) for _ in range(3)]
    await writes._record_create(_write(*first), "taken", False)
    outcomes = await asyncio.gather(
        writes._record_create(_write(*clash), "taken", False),
        writes._record_create(_write(*other), "free", False),
        return_exceptions=True,
    )
    failure, owner = outcomes
    assert isinstance(failure, Failure) and failure.verdict is Verdict.PERMANENT
    assert "already mapped to another entity" in failure.reason
    assert owner == other[0]
    # The clash wrote nothing: its create is still pending and its delivery in flight.
    assert await pool.fetchval(
        "SELECT state FROM id_mappings WHERE correlation_handle = $1", clash[1]
    ) == ("pending_create")
    assert await pool.fetchval("SELECT state FROM outbox WHERE id = $1", clash[2]) == "in_flight"
    assert await pool.fetchval("SELECT state FROM outbox WHERE id = $1", other[2]) == "done"
    assert await pool.fetchval(
        "SELECT external_id FROM id_mappings WHERE correlation_handle = $1", other[1]
    ) == ("free")


async def test_updates_recorded_together_drop_a_copy_that_changed_on_the_way_and_sync_again(
    p1: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    pool, counter = p1
    writes = _writes(pool)
    made = [await _entity_with_pending_create(pool) for _ in range(2)]
    for n, (i, h, d) in enumerate(made):
        await writes._record_create(_write(i, h, d), f"acct-{n}", False)
    entities = []
    for internal_id, _, _ in made:
        entities.append(
            dict(
                await pool.fetchrow(
                    "SELECT m.external_id, c.xmin AS copy_version FROM id_mappings m "
                    "JOIN peer_copies c USING (domain_id, internal_id) "
                    "WHERE m.domain_id = 'P1' AND m.internal_id = $1",
                    internal_id,
                )
            )
        )
    # Something else wrote to the second account's copy while the update was on its way.
    await pool.execute(
        "UPDATE peer_copies SET document = '{\"moved\": true}' WHERE internal_id = $1", made[1][0]
    )
    updates = []
    for (internal_id, handle, _), entity in zip(made, entities, strict=True):
        delivery = await pool.fetchval(
            "INSERT INTO outbox (domain_id, internal_id, kind, state, claimed_by, lease_until) "
            "VALUES ('P1', $1, 'sync', 'in_flight', $2, now() + interval '1 minute') "
            "RETURNING id",
            internal_id,
            WORKER,
        )
        updates.append((_write(internal_id, handle, delivery, title="new"), entity, delivery))
    await counter.clear()
    await asyncio.gather(*(writes._record_update(w, e) for w, e, _ in updates))
    assert len([q for q in (await counter.sent()) if q.strip().upper().startswith("BEGIN")]) == 1
    kept = await pool.fetchval(
        "SELECT document FROM peer_copies WHERE internal_id = $1", made[0][0]
    )
    assert kept["title"] == "new"
    assert not await pool.fetchval(
        "SELECT count(*) FROM peer_copies WHERE internal_id = $1", made[1][0]
    )
    assert await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE internal_id = $1 AND state = 'pending'", made[1][0]
    )
    for _, _, delivery in updates:
        assert await pool.fetchval("SELECT state FROM outbox WHERE id = $1", delivery) == "done"


async def _update_claimed(pool: asyncpg.Pool, internal_id: str) -> int:
    delivery: int = await pool.fetchval(
        "INSERT INTO outbox (domain_id, internal_id, kind, state, claimed_by, lease_until) "
        "VALUES ('P1', $1, 'sync', 'in_flight', $2, now() + interval '1 minute') RETURNING id",
        internal_id,
        WORKER,
    )
    return delivery


@pytest.mark.parametrize("together", [True, False], ids=["batched", "alone"])
async def test_an_update_sent_from_no_copy_before_a_park_landed_is_not_recorded_as_held(
    p1: tuple[asyncpg.Pool, QueryCounter], together: bool
) -> None:
    """The race of a 409's park (``Writes._unblock``): another delivery finds the entity's account
    holding a unique value and parks it aside (``value~holder``), while the entity's own update,
    computed from no copy (a PUT of home's values), is on its way and lands first. The update
    must not then record home's values as what the peer holds: the sync the park queued would
    find nothing to do, and the parked value would stay in the peer for good."""
    pool, _ = p1
    writes = _writes(pool)
    internal_id, handle, delivery = await _entity_with_pending_create(pool)
    await writes._record_create(_write(internal_id, handle, delivery), "acct-0", False)
    await pool.execute("DELETE FROM peer_copies WHERE internal_id = $1", internal_id)
    # The update is claimed and computed: no copy, so a PUT of everything.
    update = _write(internal_id, handle, await _update_claimed(pool, internal_id), title="new")
    entity = {"external_id": "acct-0", "copy_version": None}
    # The PUT lands, then the park does (it read the account before the PUT), then the update's
    # delivery records what it wrote.
    await writes._parked("P1", "acct-0")
    if together:
        await writes._record_update(update, entity)
    else:
        await writes._record_update_alone(update, entity)
    copy = await pool.fetchval(
        "SELECT document FROM peer_copies WHERE domain_id = 'P1' AND internal_id = $1",
        internal_id,
    )
    assert copy is None, f"recorded as held although a park landed after it: {copy}"
    # The entity is synced again (queued by the park, kept by the update's outcome).
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM outbox WHERE internal_id = $1 AND state = 'pending' "
            "AND kind = 'sync'",
            internal_id,
        )
        == 1
    )
    assert await pool.fetchval("SELECT state FROM outbox WHERE id = $1", update.claim.id) == "done"


async def test_a_park_makes_the_owner_s_copy_unknown_and_its_next_write_is_recorded(
    p1: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    """A park after the owner's write was recorded: the copy reads as unknown (the next sync
    sends the whole resource, a PUT), and that sync records what it sent as usual."""
    pool, _ = p1
    writes = _writes(pool)
    internal_id, handle, delivery = await _entity_with_pending_create(pool)
    await writes._record_create(_write(internal_id, handle, delivery), "acct-0", False)
    await writes._parked("P1", "acct-0")
    entity = await pool.fetchrow(query("entity_for_delivery"), "P1", internal_id)
    assert entity["copy"] is None and entity["copy_version"] is not None
    update = _write(internal_id, handle, await _update_claimed(pool, internal_id), title="new")
    await writes._record_update(update, dict(entity))
    copy = await pool.fetchval(
        "SELECT document FROM peer_copies WHERE domain_id = 'P1' AND internal_id = $1",
        internal_id,
    )
    assert copy == update.desired


async def test_the_claim_s_generic_plan_updates_its_rows_by_key_not_by_reading_the_whole_outbox(
    p1: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    """After five runs a prepared statement may use a generic plan, which does not know the
    claim's LIMIT: the rows claimed must still be found by their key, however many finished
    rows the outbox holds."""
    pool, _ = p1
    ids = [uuid.uuid4().hex for _ in range(2000)]
    async with pool.acquire() as conn, conn.transaction():
        await accounts.record_entities(conn, ids, ["User"] * len(ids))
        await conn.execute(
            "INSERT INTO outbox (domain_id, internal_id, kind, state) "
            "SELECT 'P1', i, 'sync', 'done' FROM unnest($1::text[]) AS i",
            ids,
        )
        await conn.execute(query("enqueue_sync_to"), "P1", ids, datetime.now(UTC))
    await pool.execute("ANALYZE outbox, entities, id_mappings, peer_copies")
    async with pool.acquire() as conn:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE claim(text, text, int, float8) AS {query('claim_deliveries')}")
        plan = "\n".join(
            r[0] for r in await conn.fetch("EXPLAIN EXECUTE claim('P1', 'w', 8, 60.0)")
        )
        await conn.execute("DEALLOCATE claim")
        await conn.execute("RESET plan_cache_mode")
    assert "Seq Scan on outbox" not in plan, plan


async def test_creates_begun_together_write_their_pending_rows_in_one_statement(
    p1: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    pool, counter = p1
    writes = _writes(pool)
    syncer = Syncer(writes.tools, guard=cast(Any, None))
    ids = [uuid.uuid4().hex for _ in range(3)]
    async with pool.acquire() as conn, conn.transaction():
        await accounts.record_entities(conn, ids, ["User"] * 3)
    await counter.clear()
    begun = await asyncio.gather(*(syncer._begin_create(PEER, i) for i in ids))
    inserts = [q for q in (await counter.sent()) if "INSERT INTO id_mappings" in q]
    assert len(inserts) == 1, await counter.sent()
    assert all(first for _, first in begun)
    for internal_id, (handle, _) in zip(ids, begun, strict=True):
        row = await pool.fetchrow(
            "SELECT correlation_handle, state, external_id FROM id_mappings "
            "WHERE internal_id = $1 AND domain_id = 'P1' AND is_primary",
            internal_id,
        )
        assert (row["correlation_handle"], row["state"], row["external_id"]) == (
            handle,
            "pending_create",
            None,
        )
    # A later attempt finds the row: the same handle, and not the first attempt.
    assert await syncer._begin_create(PEER, ids[0]) == (begun[0][0], False)


async def test_a_second_batch_is_written_beside_the_first_only_once_enough_items_wait() -> None:
    """One batch is written at a time while few items wait for the next (a transaction each
    costs more than the wait); once ``_SECOND`` wait, a second one is written beside it, and no
    more than ``_WRITERS``. Every item is written, and an item submitted after the writers
    finished starts a writer of its own."""
    from broker.propagation import records

    running: list[list[int]] = []
    release = asyncio.Event()
    most = 0

    async def together(items: list[int]) -> list[int]:
        nonlocal most
        running.append(items)
        most = max(most, len(running))
        await release.wait()
        running.remove(items)
        return [i * 10 for i in items]

    async def alone(item: int) -> int:
        raise AssertionError("no batch fails here")

    batcher: records.Batcher[int, int] = records.Batcher(together, alone, what="items")
    first = asyncio.create_task(batcher.submit(0))
    await until(lambda: running == [[0]], "the first batch being written")
    few = [asyncio.create_task(batcher.submit(i)) for i in range(1, records._SECOND - 1)]
    await until(lambda: len(batcher._waiting) == records._SECOND - 2, "the next batch waiting")
    assert len(batcher._writing) == 1  # they wait for the first batch
    many = [
        asyncio.create_task(batcher.submit(i))
        for i in range(records._SECOND - 1, 4 * records._SECOND)
    ]
    await until(lambda: len(running) == 2, "a second batch written beside the first")
    release.set()
    results = await asyncio.gather(first, *few, *many)
    assert results == [i * 10 for i in range(4 * records._SECOND)]
    assert most == records._WRITERS
    await batcher.finished()
    # Nothing is writing now: a new item starts a writer, and is written.
    assert await asyncio.wait_for(batcher.submit(7), timeout=30) == 70
