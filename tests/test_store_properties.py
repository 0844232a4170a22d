"""Random sequences of merges and splits through the PostgreSQL store match the pure rules, and a
replay with the same idempotency key changes nothing."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.db import create_pool
from broker.errors import BrokerError
from broker.mapping.rules import MappingState
from broker.mapping.store import MappingStore
from tests.model import (
    DOMAINS,
    ENTITIES,
    MINTED_DOMAIN,
    PUSH_DOMAINS,
    AckDelete,
    Federation,
    Merge,
    Op,
    Provision,
    Split,
    check_invariants,
    operations,
)

RESET = (
    "TRUNCATE audit_log, security_events, home_changes, event_subscriptions, outbox, operations, "
    "peer_copies, home_watermarks, id_mappings, entities, domain_tokens, domains",
    """INSERT INTO domains (id, kind, push, scim_url)
    SELECT d, 'peer', d = ANY($1::text[]), CASE WHEN d = ANY($1::text[]) THEN 'http://peer/' END
    FROM unnest($2::text[]) AS d""",
    "INSERT INTO entities (internal_id, resource_type) SELECT e, 'User' FROM unnest($1::text[]) AS e",
)

SNAPSHOT = """
SELECT (SELECT array_agg(row(internal_id, domain_id, external_id, is_primary, state)::text ORDER BY id)
        FROM id_mappings),
       (SELECT array_agg(row(internal_id, state, merged_into)::text ORDER BY internal_id) FROM entities),
       (SELECT count(*) FROM outbox), (SELECT count(*) FROM operations)
"""


async def _apply(store: MappingStore, fed: Federation, op: Op) -> None:
    """Apply ``op`` to the store and to the model; a refusal must come from both or neither."""
    if isinstance(op, Provision):
        row = fed.provision(op)
        if row is not None:
            if op.domain == MINTED_DOMAIN:
                minted = await store.resolve_outbound(op.domain, {op.entity: "User"}, mint=True)
                fed.rows[-1] = row = type(row)(**{**row.__dict__, "external_id": minted[op.entity]})
            else:
                await store.add_mapping(op.entity, op.domain, row.external_id, state=row.state)
        return
    if isinstance(op, AckDelete):
        gone = fed.ack_delete(op)
        if gone is not None:
            await store.pool.execute(
                "DELETE FROM id_mappings WHERE domain_id = $1 AND external_id = $2",
                gone.domain,
                gone.external_id,
            )
        return
    model_error = store_error = None
    try:
        fed.merge(op) if isinstance(op, Merge) else fed.split(op)
    except BrokerError as exc:
        model_error = exc
    try:
        await _store_op(store, op)
    except BrokerError as exc:
        store_error = exc
    assert (model_error is None) == (store_error is None), (model_error, store_error)


async def _store_op(store: MappingStore, op: Merge | Split) -> None:
    if isinstance(op, Merge):
        await store.merge(op.survivor, op.losers, idempotency_key=op.key, actor="prop")
    else:
        moves = {new: list(refs) for new, refs in op.moves}
        await store.split(op.source, moves, idempotency_key=op.key, actor="prop", provision="eager")


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
            await pool.execute(RESET[2], list(ENTITIES))
            store = MappingStore(pool)
            fed = Federation()
            for _ in range(data.draw(st.integers(1, 12), label="steps")):
                op = data.draw(operations(fed), label="op")
                await _apply(store, fed, op)
                model = {
                    (r.internal_id, r.domain, r.external_id, r.primary, r.state.value)
                    for r in fed.rows
                }
                assert await _table(pool) == model
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
