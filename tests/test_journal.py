"""The write journal's one-statement path (``record_alone``) writes what the transaction path
(``record``) writes, on a real PostgreSQL: entities, their history, the syncs toward every push
peer but the writer, sealed write-only values; and stands aside when a domain subscribes to SETs."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg

from broker.db import query
from broker.propagation.journal import Journal, record
from broker.propagation.writes import HomeWrite
from broker.secrets import SecretBox
from tests.conftest import QueryCounter
from tests.waiting import until

BOX = SecretBox(bytes(32))


async def _domains(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "INSERT INTO domains (id, kind, push, scim_url) VALUES "
        "('H', 'home', false, NULL), ('P1', 'peer', true, 'http://p1'), "
        "('P2', 'peer', true, 'http://p2'), ('W', 'peer', true, 'http://w'), "
        "('R', 'peer', false, NULL)"
    )


def _writes(prefix: str) -> list[HomeWrite]:
    """Creates, a password set, a change found by a poll, a deletion; the writer W."""
    return [
        HomeWrite(
            written={f"{prefix}u1": "User", f"{prefix}g1": "Group"},
            origin="W",
            verbs={f"{prefix}u1": "create", f"{prefix}g1": "put"},
        ),
        HomeWrite.of_resource(
            f"{prefix}u2", "User", verb="patch", origin="W", write_only={"password": "s3cret!"}
        ),
        HomeWrite(written={f"{prefix}u3": "User"}),
        HomeWrite.of_deletion([f"{prefix}u1"], origin="W"),
    ]


async def _state(pool: asyncpg.Pool, prefix: str) -> dict[str, Any]:
    """What the journal wrote about the entities named ``prefix``..., with the prefix cut."""
    cut = len(prefix)
    entities = await pool.fetch(
        "SELECT substr(internal_id, $2) AS id, resource_type, state FROM entities "
        "WHERE internal_id LIKE $1 || '%' ORDER BY 1",
        prefix,
        cut + 1,
    )
    history = await pool.fetch(
        "SELECT substr(internal_id, $2) AS id, domain_id, kind, status FROM entity_history "
        "WHERE internal_id LIKE $1 || '%' ORDER BY id",
        prefix,
        cut + 1,
    )
    outbox = await pool.fetch(
        "SELECT substr(internal_id, $2) AS id, domain_id, kind, state, "
        "sealed_values IS NOT NULL AS sealed FROM outbox "
        "WHERE internal_id LIKE $1 || '%' ORDER BY id",
        prefix,
        cut + 1,
    )
    opened = {
        r["internal_id"][cut:]: BOX.open(r["sealed_values"])
        for r in await pool.fetch(
            "SELECT internal_id, sealed_values FROM outbox "
            "WHERE internal_id LIKE $1 || '%' AND sealed_values IS NOT NULL",
            prefix,
        )
    }
    return {
        "entities": [tuple(r) for r in entities],
        "history": [tuple(r) for r in history],
        "outbox": [tuple(r) for r in outbox],
        "sealed": opened,
    }


async def test_one_statement_records_what_the_transaction_records(
    counted_pool: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    pool, counter = counted_pool
    await _domains(pool)
    journal = Journal(pool, lambda: BOX)
    await journal.record(HomeWrite(written={"warm": "User"}))  # asyncpg's type introspection
    await counter.clear()
    for write in _writes("a-"):
        await journal.record(write)
    assert len(await counter.sent()) == len(_writes("a-")), (
        await counter.sent()
    )  # one statement a write
    for write in _writes("b-"):
        async with pool.acquire() as conn, conn.transaction():
            await record(conn, write, box=lambda: BOX)
    alone, together = await _state(pool, "a-"), await _state(pool, "b-")
    assert alone == together
    # What the writes imply: W's writes never back to W, nothing to R (no push); the password
    # sealed.
    assert {r[1] for r in alone["outbox"]} == {"P1", "P2", "W"}
    assert {r[0] for r in alone["outbox"] if r[1] == "W"} == {"u3"}
    assert set(alone["sealed"]) == {"u2"}
    assert ("u1", "User", "deleted") in alone["entities"]


async def test_with_a_subscriber_the_journal_records_the_changes_for_the_sets(
    counted_pool: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    pool, counter = counted_pool
    await _domains(pool)
    await pool.execute("INSERT INTO event_subscriptions (domain_id, delivery) VALUES ('R', 'poll')")
    journal = Journal(pool, lambda: BOX)
    await counter.clear()
    await journal.record(
        HomeWrite.of_resource("c-u1", "User", verb="create", origin="W", document={"id": "c-u1"})
    )
    assert (
        len(await counter.sent()) > 1
    )  # the one statement answered false and wrote nothing: then the rest
    changes = await pool.fetchval("SELECT count(*) FROM home_changes WHERE internal_id = 'c-u1'")
    assert changes == 1
    history = await pool.fetchval("SELECT count(*) FROM entity_history WHERE internal_id = 'c-u1'")
    assert history == 1  # written once, not by both paths
    syncs = await pool.fetchval("SELECT count(*) FROM outbox WHERE internal_id = 'c-u1'")
    assert syncs == 2


async def test_a_write_rolled_back_to_break_a_deadlock_is_recorded_again(
    pool: asyncpg.Pool,
) -> None:
    """A real deadlock: another transaction has enqueued a sync of the entity toward P2 (not
    committed), the journal's deletion enqueues toward P1, then waits on P2's, and the other
    transaction then enqueues toward P1. PostgreSQL rolls the journal's statement back (its
    wait began first, so its deadlock check runs first); the write must be recorded all the
    same, not lost (home has taken it)."""
    await _domains(pool)
    await pool.execute("INSERT INTO entities (internal_id, resource_type) VALUES ('d-u1', 'User')")
    journal = Journal(pool, lambda: BOX)
    async with pool.acquire() as other:
        transaction = other.transaction()
        await transaction.start()
        await other.execute("SET LOCAL deadlock_timeout = '60s'")  # the journal is the victim
        await other.execute(query("enqueue_sync_to"), "P2", ["d-u1"], datetime.now(UTC))
        recording = asyncio.create_task(journal.record(HomeWrite.of_deletion(["d-u1"])))

        async def journal_waits() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid))",
                    other.get_server_pid(),
                )
            )

        await until(journal_waits, "the journal waiting on the other transaction's enqueue")
        # The cycle: this waits for the journal's enqueue toward P1, until PostgreSQL breaks it.
        await other.execute(query("enqueue_sync_to"), "P1", ["d-u1"], datetime.now(UTC))
        await transaction.commit()
    await asyncio.wait_for(recording, timeout=60)
    assert await pool.fetchval("SELECT state FROM entities WHERE internal_id = 'd-u1'") == (
        "deleted"
    )
    assert (
        await pool.fetchval(
            "SELECT status FROM entity_history WHERE internal_id = 'd-u1' AND kind = 'write'"
        )
        == "delete"
    )
    syncs = await pool.fetch(
        "SELECT domain_id FROM outbox WHERE internal_id = 'd-u1' AND state = 'pending' "
        "ORDER BY domain_id"
    )
    assert [r["domain_id"] for r in syncs] == ["P1", "P2", "W"]
