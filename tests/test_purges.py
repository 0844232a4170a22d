"""The purge of acknowledged SETs and of the home changes no SET names any more: old settled rows
go, unsettled and recent ones stay, and the last change of each entity stays as the base of its
next one."""

from __future__ import annotations

import asyncpg

from broker.db import query
from broker.events.purge import EventRetention, purge_events

DAY = 86400.0
RETENTION = EventRetention(acknowledged=7 * DAY, changes=30 * DAY)


async def _change(pool: asyncpg.Pool, entity: str, age_days: float, document: bool = True) -> int:
    change_id: int = await pool.fetchval(
        """INSERT INTO home_changes (txn, internal_id, kinds, document, at)
           VALUES (gen_random_uuid(), $1, ARRAY['patch'], $2, now() - make_interval(days => $3))
           RETURNING id""",
        entity,
        {"id": entity, "displayName": f"v{age_days}"} if document else None,
        age_days,
    )
    return change_id


async def _event(pool: asyncpg.Pool, change_id: int, state: str, settled_days: float) -> int:
    event_id: int = await pool.fetchval(
        """INSERT INTO security_events (domain_id, change_id, internal_id, jti, state, settled_at)
           SELECT 'D1', c.id, c.internal_id, gen_random_uuid()::text, $2,
                  CASE WHEN $2 IN ('acknowledged', 'skipped', 'failed')
                       THEN now() - make_interval(days => $3) END
           FROM home_changes c WHERE c.id = $1
           RETURNING id""",
        change_id,
        state,
        settled_days,
    )
    return event_id


async def _ids(pool: asyncpg.Pool, table: str) -> set[int]:
    return {r["id"] for r in await pool.fetch(f"SELECT id FROM {table}")}


async def _federation(pool: asyncpg.Pool) -> None:
    await pool.execute("INSERT INTO domains (id, kind) VALUES ('D1', 'peer')")
    await pool.execute(
        "INSERT INTO entities (internal_id, resource_type) VALUES ('E1', 'User'), "
        "('E2', 'User'), ('E3', 'User')"
    )


async def test_old_acknowledged_sets_and_the_changes_they_named_go_the_rest_stays(
    pool: asyncpg.Pool,
) -> None:
    await _federation(pool)
    old_e1 = await _change(pool, "E1", 40)
    acked_old = await _event(pool, old_e1, "acknowledged", 10)
    skipped_old = await _event(pool, await _change(pool, "E1", 40), "skipped", 10)
    recent_ack_change = await _change(pool, "E1", 40)
    acked_recently = await _event(pool, recent_ack_change, "acknowledged", 1)
    last_e1 = await _change(pool, "E1", 0)
    pending_new = await _event(pool, last_e1, "pending", 0)
    # E2's only change: its SET goes, the change stays (the base of E2's next change).
    only_e2 = await _change(pool, "E2", 40)
    acked_e2 = await _event(pool, only_e2, "acknowledged", 10)
    # Never settled, however old: a domain has yet to take them, or a person to look.
    unsettled = {
        await _event(pool, await _change(pool, "E3", 40), state, 40)
        for state in ("pending", "sent", "failed")
    }
    young_e3 = await _change(pool, "E3", 1, document=False)  # no SET, but young
    orphan_old = await _change(pool, "E3", 40, document=False)  # no SET, old: goes
    changes_before = await _ids(pool, "home_changes")

    events, changes = await purge_events(pool, RETENTION, batch=1)  # a statement per row

    assert await _ids(pool, "security_events") == {acked_recently, pending_new} | unsettled
    assert (events, changes) == (3, 3)
    gone = changes_before - await _ids(pool, "home_changes")
    assert old_e1 in gone and orphan_old in gone and len(gone) == 3  # and skipped_old's change
    assert {only_e2, last_e1, recent_ack_change, young_e3} <= await _ids(pool, "home_changes")
    assert acked_old not in await _ids(pool, "security_events")
    assert skipped_old not in await _ids(pool, "security_events")
    assert acked_e2 not in await _ids(pool, "security_events")
    base = await pool.fetch(query("previous_documents"), ["E2"])
    assert base[0]["document"] == {"id": "E2", "displayName": "v40"}
    assert await purge_events(pool, RETENTION) == (0, 0)  # nothing more to do


async def test_a_retention_of_zero_keeps_everything(pool: asyncpg.Pool) -> None:
    await _federation(pool)
    change = await _change(pool, "E1", 400, document=False)
    await _event(pool, change, "acknowledged", 400)
    await _change(pool, "E2", 400, document=False)
    assert await purge_events(pool, EventRetention(acknowledged=0, changes=0)) == (0, 0)
    assert len(await _ids(pool, "security_events")) == 1
    assert len(await _ids(pool, "home_changes")) == 2
