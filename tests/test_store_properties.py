"""Random sequences of merges, splits, refused requests, entity deletes and completed alias
clean-ups through the PostgreSQL store match the naive model (``tests/model.py``): the same
table, entities, peer tasks (with their cancellations) and refusals after every step; and a
replay with the same idempotency key changes nothing.

``pytest --hypothesis-show-statistics tests/test_store_properties.py`` counts the refusals and
the completed clean-ups."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from broker.db import create_pool, query
from broker.errors import BrokerError
from broker.mapping.rules import MappingState
from broker.mapping.store import MappingStore, Operation
from broker.propagation.journal import Journal
from broker.propagation.writes import HomeWrite
from tests.model import (
    DOMAINS,
    ENTITIES,
    MINTED_DOMAIN,
    PUSH_DOMAINS,
    TYPES,
    AckDelete,
    Delete,
    Federation,
    Merge,
    Op,
    Provision,
    Refused,
    Split,
    check_invariants,
    operations,
)

RESET = (
    # Not audit_log: it is append-only (0013), and nothing here reads it.
    "TRUNCATE console_sessions, entity_history, security_events, home_changes, "
    "event_subscriptions, outbox, operations, reconciliation_items, reconciliation_home, "
    "reconciliations, peer_copies, home_watermarks, id_mappings, entities, domain_tokens, domains",
    """INSERT INTO domains (id, kind, push, scim_url)
    SELECT d, 'peer', d = ANY($1::text[]), CASE WHEN d = ANY($1::text[]) THEN 'http://peer/' END
    FROM unnest($2::text[]) AS d""",
    "INSERT INTO entities (internal_id, resource_type) SELECT * FROM unnest($1::text[], $2::text[])",
)

SNAPSHOT = """
SELECT (SELECT array_agg(row(internal_id, domain_id, external_id, is_primary, state)::text ORDER BY id)
        FROM id_mappings),
       (SELECT array_agg(row(internal_id, state, merged_into)::text ORDER BY internal_id) FROM entities),
       (SELECT count(*) FROM outbox), (SELECT count(*) FROM operations)
"""


async def _apply(store: MappingStore, fed: Federation, op: Op) -> str | None:
    """Apply ``op`` to the store and to the model: the same refusal (status) or none; what
    happened, for the statistics."""
    if isinstance(op, Provision):
        row = fed.provision(op)
        if row is not None:
            if op.domain == MINTED_DOMAIN:
                types = {op.entity: fed.entities[op.entity].type}
                minted = await store.resolve_outbound(op.domain, types, mint=True)
                row.external_id = minted[op.entity]
            else:
                await store.add_mapping(op.entity, op.domain, row.external_id, state=row.state)
        return None
    if isinstance(op, AckDelete):
        # The worker's share, as it does it once the peer answered: the clean-up's deliveries
        # are done and the alias is retired (or removed: retention 0).
        done = fed.ack_delete(op)
        assert done is not None, "the generator acknowledges only deletes that are pending"
        async with store.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE outbox SET state = 'done' WHERE state = 'pending' AND domain_id = $1 "
                "AND kind IN ('move_memberships', 'delete_alias') AND payload->>'external_id' = $2",
                op.domain,
                done.external_id,
            )
            retention = 3600 if op.retain else 0
            await conn.execute(query("retire_alias"), op.domain, done.external_id, retention)
        return "alias clean-up completed"
    if isinstance(op, Delete):
        fed.delete(op)
        await Journal(store.pool, None).record(HomeWrite.of_deletion([op.entity]))
        return None
    kind = type(op).__name__.lower()
    model: Refused | None = None
    try:
        applied = fed.merge(op) if isinstance(op, Merge) else fed.split(op)
    except Refused as exc:
        model = exc
    try:
        answer = await _store_op(store, op)
    except BrokerError as exc:
        assert model is not None, f"the store refuses {op} ({exc}), the model does not"
        assert exc.status == model.status, (exc, model)
        return f"{kind} refused {exc.status}"
    assert model is None, f"the model refuses {op} ({model}), the store does not"
    assert answer.replayed == (not applied), op
    return f"{kind} {'replayed' if answer.replayed else 'done'}"


async def _store_op(store: MappingStore, op: Merge | Split) -> Operation:
    if isinstance(op, Merge):
        return await store.merge(op.survivor, op.losers, idempotency_key=op.key, actor="prop")
    moves = {new: list(refs) for new, refs in op.moves}
    return await store.split(
        op.source, moves, idempotency_key=op.key, actor="prop", provision=op.provision
    )


async def _entities(pool: asyncpg.Pool) -> set[tuple[str, str, str | None]]:
    records = await pool.fetch("SELECT internal_id, state, merged_into FROM entities")
    return {tuple(r) for r in records}  # type: ignore[misc]


async def _deliveries(
    pool: asyncpg.Pool,
) -> list[tuple[str, str, str, str | None, str | None, str]]:
    """The outbox rows of the operations' peer tasks (not the syncs around them)."""
    records = await pool.fetch(
        "SELECT kind, domain_id, internal_id, payload->>'external_id', "
        "payload->>'target_external_id', state FROM outbox "
        "WHERE operation_id IS NOT NULL AND kind IN ('move_memberships', 'delete_alias', 'provision')"
    )
    return sorted(tuple(r) for r in records)  # type: ignore[misc]


async def _table(pool: asyncpg.Pool) -> set[tuple[str, str, str | None, bool, str]]:
    records = await pool.fetch(
        "SELECT internal_id, domain_id, external_id, is_primary, state FROM id_mappings"
    )
    return {tuple(r) for r in records}  # type: ignore[misc]


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_the_store_applies_exactly_what_the_rules_say_and_replays_change_nothing(
    db_url: str, data: st.DataObject
) -> None:
    async def example() -> None:
        pool = await create_pool(db_url, min_size=1, max_size=2)
        try:
            await pool.execute(RESET[0])
            await pool.execute(RESET[1], list(PUSH_DOMAINS), list(DOMAINS))
            await pool.execute(RESET[2], list(ENTITIES), [TYPES[e] for e in ENTITIES])
            store = MappingStore(pool)
            fed = Federation()
            for _ in range(data.draw(st.integers(1, 25), label="steps")):
                op = data.draw(operations(fed), label="op")
                outcome = await _apply(store, fed, op)
                if outcome:
                    event(outcome)
                assert await _table(pool) == fed.table()
                assert await _entities(pool) == {
                    (name, e.state, e.merged_into) for name, e in fed.entities.items()
                }
                assert await _deliveries(pool) == sorted(
                    (*d.task(), d.state) for d in fed.deliveries
                )
                check_invariants(fed)
                if isinstance(op, Merge | Split):
                    # The same operation again, same key: the database does not move.
                    before = await pool.fetchrow(SNAPSHOT)
                    # Refused the first time too? Then nothing was recorded under the key.
                    with contextlib.suppress(BrokerError):
                        await _store_op(store, op)
                    assert await pool.fetchrow(SNAPSHOT) == before
            pending = await pool.fetchval(
                "SELECT count(*) FROM id_mappings WHERE state = $1",
                MappingState.DELETION_REQUIRED.value,
            )
            queued = await pool.fetchval(
                "SELECT count(DISTINCT payload->>'external_id') FROM outbox "
                "WHERE kind = 'delete_alias' AND state = 'pending'"
            )
            assert queued >= pending  # every alias awaiting deletion has its delete queued
        finally:
            await pool.close()

    asyncio.run(example())
