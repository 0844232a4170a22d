"""The PostgreSQL store: batched translation, and merges and splits committed with their outbox rows."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from broker.db import query
from broker.errors import ConflictError, InvalidValueError
from broker.mapping.rules import MappingState, Origin, apply_plan, plan_merge
from broker.mapping.store import EntityStateError, IdempotencyKeyReused, MappingStore, UnknownEntity
from tests.conftest import QueryCounter


async def _setup(pool: asyncpg.Pool) -> None:
    await pool.execute(
        """
        INSERT INTO domains (id, kind, push, scim_url) VALUES
            ('D1', 'peer', false, NULL), ('D2', 'peer', true, 'http://d2.example/scim/v2'),
            ('D3', 'peer', true, 'http://d3.example/scim/v2');
        """
    )


@pytest.fixture
async def store(pool: asyncpg.Pool) -> MappingStore:
    await _setup(pool)
    return MappingStore(pool)


async def _table(pool: asyncpg.Pool) -> set[tuple[str, str, str | None, bool, str]]:
    records = await pool.fetch(
        "SELECT internal_id, domain_id, external_id, is_primary, state FROM id_mappings"
    )
    return {tuple(r) for r in records}  # type: ignore[misc]


async def _seed_false_negative(store: MappingStore) -> None:
    await store.register_entities({"9caf78aac3d6": "User", "273d36e30d09": "User"})
    await store.add_mapping("9caf78aac3d6", "D2", "ff487230b3a0")
    await store.add_mapping("273d36e30d09", "D2", "41206cc97c8b")


# ------------------------------------------------------------------------ translation


async def test_inbound_resolution_of_1000_ids_is_one_query(
    counted_pool: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    pool, counter = counted_pool
    await _setup(pool)
    store = MappingStore(pool)
    internal = {f"user-{i}": "User" for i in range(1000)}
    minted = await store.resolve_outbound("D1", internal, mint=True)
    await counter.clear()
    resolved = await store.resolve_inbound("D1", [*minted.values(), "unknown-id"])
    assert len(await counter.sent()) == 1
    assert resolved == {external: internal_id for internal_id, external in minted.items()}


async def test_outbound_resolution_of_1000_ids_is_two_queries_minting_included(
    counted_pool: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    pool, counter = counted_pool
    await _setup(pool)
    store = MappingStore(pool)
    internal = {f"user-{i}": "User" for i in range(1000)}
    await counter.clear()
    first = await store.resolve_outbound("D1", internal, mint=True)
    assert (await counter.sent()) == [query("lookup_outbound"), query("resolve_outbound")]
    assert set(first) == set(internal)
    assert len(set(first.values())) == 1000
    await counter.clear()
    assert await store.resolve_outbound("D1", internal, mint=True) == first  # stable
    # Every entity known and mapped: one read-only statement, nothing written.
    assert (await counter.sent()) == [query("lookup_outbound")]


async def test_the_outbound_lookup_reads_the_mapping_tables_index_only(
    store: MappingStore, pool: asyncpg.Pool
) -> None:
    """0022: the probe of id_mappings in lookup_outbound (the domain's primary row) finds every
    column it needs in id_mappings_one_primary, so on a table at rest it never visits the
    heap (one random page fewer per ID at 10 million rows). entities keeps its plain key: the
    first read of an entity records its type, which stays a heap-only update."""
    internal = {f"user-{i}": "User" for i in range(200)}
    minted = await store.resolve_outbound("D1", internal, mint=True)
    # The table at rest, as autovacuum leaves it: every page all-visible. (The test server
    # commits asynchronously, and VACUUM marks a page only once its rows' commits are flushed,
    # which CHECKPOINT does; no ANALYZE, whose own commit would come after the flush.)
    await pool.execute("CHECKPOINT")
    await pool.execute("VACUUM entities, id_mappings")
    async with pool.acquire() as conn, conn.transaction():
        # The tables are small: take away the plans a small table prefers, as 10M rows do.
        await conn.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off")
        plan = await conn.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + query("lookup_outbound"), "D1", list(internal)
        )
    scans = {s["Index Name"]: s for s in _scans(plan[0]["Plan"])}  # the pool decodes json
    mapping = scans["id_mappings_one_primary"]
    assert (mapping["Node Type"], mapping["Heap Fetches"]) == ("Index Only Scan", 0)
    assert scans["entities_pkey"]["Node Type"] == "Index Scan"
    assert await MappingStore(pool).resolve_outbound("D1", internal, mint=False) == minted


def _scans(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node] if "Index Name" in node else []
    for child in node.get("Plans", []):
        found += _scans(child)
    return found


async def test_a_read_of_entities_seen_with_no_type_records_their_type_and_mints_nothing(
    counted_pool: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    pool, counter = counted_pool
    await _setup(pool)
    store = MappingStore(pool)
    await store.register_entities({"a1": "unknown", "a2": "unknown"})
    await store.add_mapping("a1", "D2", "x1")
    await counter.clear()
    assert await store.resolve_outbound(
        "D2", {"a1": "User", "a2": "User", "a3": "Group"}, mint=False
    ) == {"a1": "x1"}
    assert (await counter.sent()) == [query("lookup_outbound"), query("record_seen_entities")]
    types = dict(await pool.fetch("SELECT internal_id, resource_type FROM entities ORDER BY 1"))
    assert {k: types[k] for k in ("a1", "a2", "a3")} == {"a1": "User", "a2": "User", "a3": "Group"}
    assert await pool.fetchval("SELECT count(*) FROM id_mappings WHERE internal_id <> 'a1'") == 0
    await counter.clear()
    await store.resolve_outbound("D2", {"a1": "User", "a2": "User"}, mint=False)
    assert (await counter.sent()) == [query("lookup_outbound")]


async def test_two_domains_get_different_pairwise_ids_and_never_the_internal_one(
    store: MappingStore, pool: asyncpg.Pool
) -> None:
    await pool.execute("INSERT INTO domains (id, kind) VALUES ('D4', 'peer')")
    entities = {str(uuid.uuid4()): "User" for _ in range(50)}
    d1 = await store.resolve_outbound("D1", entities, mint=True)
    d4 = await store.resolve_outbound("D4", entities, mint=True)
    for internal_id in entities:
        assert d1[internal_id] != d4[internal_id]
        assert internal_id not in (d1[internal_id], d4[internal_id])
    # Domain 4's IDs mean nothing in domain 1.
    assert await store.resolve_inbound("D1", d4.values()) == {}


async def test_a_push_domain_gets_no_minted_id_its_entities_wait_for_provisioning(
    store: MappingStore,
) -> None:
    entities = {"a": "User", "b": "User"}
    await store.register_entities(entities)
    await store.add_mapping("a", "D2", "peer-a")
    await store.add_mapping("b", "D2", None, state=MappingState.PENDING_CREATE)
    assert await store.resolve_outbound("D2", entities, mint=False) == {"a": "peer-a"}
    # Even where minting is asked for, a pending create is not replaced by a minted ID.
    assert await store.resolve_outbound("D2", entities, mint=True) == {"a": "peer-a"}


async def test_concurrent_minting_for_one_entity_agrees_on_one_id(store: MappingStore) -> None:
    results = await asyncio.gather(
        *(store.resolve_outbound("D1", {"x": "User"}, mint=True) for _ in range(5))
    )
    assert len({r["x"] for r in results}) == 1


async def test_a_merged_entity_is_translated_as_its_survivor(store: MappingStore) -> None:
    await _seed_false_negative(store)
    await store.merge("9caf78aac3d6", ["273d36e30d09"], idempotency_key="k", actor="test")
    assert await store.resolve_outbound("D2", {"273d36e30d09": "User"}, mint=False) == {
        "273d36e30d09": "ff487230b3a0"
    }
    # Inbound, the alias resolves to the survivor.
    assert await store.resolve_inbound("D2", ["41206cc97c8b"]) == {"41206cc97c8b": "9caf78aac3d6"}


# ------------------------------------------------------------------------ merge and split


async def test_merge_commits_the_seed_table_with_its_outbox_rows_and_audit(
    store: MappingStore, pool: asyncpg.Pool
) -> None:
    await _seed_false_negative(store)
    rows = await store.rows_of(["9caf78aac3d6", "273d36e30d09"])
    expected = apply_plan(rows, plan_merge("9caf78aac3d6", ["273d36e30d09"], rows))
    op = await store.merge("9caf78aac3d6", ["273d36e30d09"], idempotency_key="merge-1", actor="ops")
    assert op.state == "propagating"
    assert op.progress == {"D2": {"state": "pending", "tasks": 2, "done": 0}}
    assert (await store.operation(op.id)).request == {
        "survivor": "9caf78aac3d6",
        "losers": ["273d36e30d09"],
    }
    assert await _table(pool) == {
        ("9caf78aac3d6", "D2", "ff487230b3a0", True, "active"),
        ("9caf78aac3d6", "D2", "41206cc97c8b", False, "deletion_required"),
    }
    assert set(await store.rows_of(["9caf78aac3d6"])) == set(expected)
    outbox = await pool.fetch(
        "SELECT domain_id, internal_id, kind, payload, operation_id FROM outbox ORDER BY id"
    )
    assert [(r["domain_id"], r["kind"], r["payload"]) for r in outbox] == [
        (
            "D2",
            "move_memberships",
            {"external_id": "41206cc97c8b", "target_external_id": "ff487230b3a0"},
        ),
        ("D2", "delete_alias", {"external_id": "41206cc97c8b"}),
    ]
    assert all(r["operation_id"] == op.id for r in outbox)
    entity = await pool.fetchrow(
        "SELECT state, merged_into FROM entities WHERE internal_id = '273d36e30d09'"
    )
    assert tuple(entity) == ("merged", "9caf78aac3d6")
    audit = await pool.fetchrow("SELECT actor, action, subject, details FROM audit_log")
    assert (audit["actor"], audit["action"], audit["subject"]) == ("ops", "merge", "9caf78aac3d6")
    assert audit["details"]["operation"] == str(op.id)


async def test_the_same_idempotency_key_changes_nothing_the_second_time(
    store: MappingStore, pool: asyncpg.Pool
) -> None:
    await _seed_false_negative(store)
    first = await store.merge("9caf78aac3d6", ["273d36e30d09"], idempotency_key="k1", actor="ops")
    table = await _table(pool)
    again = await store.merge("9caf78aac3d6", ["273d36e30d09"], idempotency_key="k1", actor="ops")
    assert again.id == first.id and again.replayed and not first.replayed
    assert await _table(pool) == table
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 2
    assert await pool.fetchval("SELECT count(*) FROM audit_log") == 1


async def test_an_idempotency_key_reused_for_another_request_is_refused(
    store: MappingStore,
) -> None:
    await _seed_false_negative(store)
    await store.register_entities({"other": "User"})
    await store.merge("9caf78aac3d6", ["273d36e30d09"], idempotency_key="k1", actor="ops")
    with pytest.raises(IdempotencyKeyReused, match="use a new key"):
        await store.merge("9caf78aac3d6", ["other"], idempotency_key="k1", actor="ops")


async def test_merging_an_entity_twice_says_where_it_went_and_changes_nothing(
    store: MappingStore, pool: asyncpg.Pool
) -> None:
    await _seed_false_negative(store)
    await store.merge("9caf78aac3d6", ["273d36e30d09"], idempotency_key="k1", actor="ops")
    table = await _table(pool)
    with pytest.raises(EntityStateError, match="was merged into 9caf78aac3d6"):
        await store.merge("9caf78aac3d6", ["273d36e30d09"], idempotency_key="k2", actor="ops")
    assert await _table(pool) == table
    assert await pool.fetchval("SELECT count(*) FROM operations") == 1


async def test_unknown_entities_and_mixed_resource_types_are_refused(
    store: MappingStore, pool: asyncpg.Pool
) -> None:
    await store.register_entities({"u": "User", "g": "Group"})
    with pytest.raises(UnknownEntity, match="never seen entity nobody") as unknown:
        await store.merge("u", ["nobody"], idempotency_key="k1", actor="ops")
    assert unknown.value.status == 404
    with pytest.raises(InvalidValueError, match="one resource type") as mixed:
        await store.merge("u", ["g"], idempotency_key="k2", actor="ops")
    assert (mixed.value.status, mixed.value.scim_type) == (400, "invalidValue")
    # Refused operations leave nothing behind, not even their idempotency keys.
    assert await pool.fetchval("SELECT count(*) FROM operations") == 0
    assert await pool.fetchval("SELECT count(*) FROM audit_log") == 0


async def test_a_merge_that_fails_midway_commits_nothing(
    store: MappingStore, pool: asyncpg.Pool
) -> None:
    await _seed_false_negative(store)
    table = await _table(pool)
    # Make the outbox refuse rows: the mapping change must not commit without them.
    await pool.execute(
        """
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'outbox unavailable'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION refuse();
        """
    )
    with pytest.raises(asyncpg.RaiseError, match="outbox unavailable"):
        await store.merge("9caf78aac3d6", ["273d36e30d09"], idempotency_key="k1", actor="ops")
    assert await _table(pool) == table
    assert await pool.fetchval("SELECT count(*) FROM operations") == 0
    assert (
        await pool.fetchval("SELECT state FROM entities WHERE internal_id = '273d36e30d09'")
        == "active"
    )
    # Once the outbox is back, the same key applies the merge.
    await pool.execute("DROP TRIGGER refuse ON outbox")
    op = await store.merge("9caf78aac3d6", ["273d36e30d09"], idempotency_key="k1", actor="ops")
    assert not op.replayed and op.state == "propagating"


async def test_a_split_undoing_a_merge_cancels_the_pending_delete(
    store: MappingStore, pool: asyncpg.Pool
) -> None:
    await _seed_false_negative(store)
    await store.merge("9caf78aac3d6", ["273d36e30d09"], idempotency_key="m", actor="ops")
    op = await store.split(
        "9caf78aac3d6", {"new-1": [("D2", "41206cc97c8b")]}, idempotency_key="s", actor="ops"
    )
    assert op.state == "done"
    assert await _table(pool) == {
        ("9caf78aac3d6", "D2", "ff487230b3a0", True, "active"),
        ("new-1", "D2", "41206cc97c8b", True, "active"),
    }
    states = await pool.fetch("SELECT kind, state FROM outbox ORDER BY id")
    assert [tuple(r) for r in states] == [
        ("move_memberships", "cancelled"),
        ("delete_alias", "cancelled"),
        # The account that was the alias is new-1's now: it gets new-1's state.
        ("sync", "pending"),
    ]
    assert (
        await pool.fetchval("SELECT resource_type FROM entities WHERE internal_id = 'new-1'")
        == "User"
    )


async def test_an_eager_split_queues_provisioning_into_every_push_peer(
    store: MappingStore, pool: asyncpg.Pool
) -> None:
    await store.register_entities({"S": "User"})
    await store.add_mapping("S", "D2", "s2")
    await store.resolve_outbound("D1", {"S": "User"}, mint=True)
    op = await store.split("S", {"N": []}, idempotency_key="s", actor="ops", provision="eager")
    assert op.progress == {"D2": {"state": "pending", "tasks": 1, "done": 0}}
    rows = await pool.fetch("SELECT domain_id, internal_id, kind FROM outbox ORDER BY id")
    # D2 knew the source: the split's provisioning task. D3 (push, the source not there yet):
    # a sync. D1 (pull) mints on first read.
    assert sorted(tuple(r) for r in rows) == [("D2", "N", "provision"), ("D3", "N", "sync")]


async def test_a_split_where_primaries_trade_places_commits(
    store: MappingStore, pool: asyncpg.Pool
) -> None:
    # S's primary moves to N while S's alias becomes S's primary again, in one statement.
    await _seed_false_negative(store)
    await store.merge("9caf78aac3d6", ["273d36e30d09"], idempotency_key="m", actor="ops")
    await store.split(
        "9caf78aac3d6", {"n": [("D2", "ff487230b3a0")]}, idempotency_key="s", actor="ops"
    )
    assert await _table(pool) == {
        ("n", "D2", "ff487230b3a0", True, "active"),
        ("9caf78aac3d6", "D2", "41206cc97c8b", True, "active"),
    }


async def test_concurrent_merges_touching_one_entity_serialise_without_deadlock(
    store: MappingStore, pool: asyncpg.Pool
) -> None:
    entities = {f"e{i}": "User" for i in range(8)}
    await store.register_entities(entities)
    for i in range(8):
        await store.add_mapping(f"e{i}", "D2", f"x{i}")
    # Every pair wants e0 or e7, in opposite orders: without ordered locks this deadlocks.
    requests = [("e0", [f"e{i}", "e7"]) for i in range(1, 7)] + [
        ("e7", [f"e{i}", "e0"]) for i in range(1, 7)
    ]
    results = await asyncio.gather(
        *(
            store.merge(s, losers, idempotency_key=f"k{n}", actor="ops")
            for n, (s, losers) in enumerate(requests)
        ),
        return_exceptions=True,
    )
    assert not [r for r in results if isinstance(r, asyncpg.DeadlockDetectedError)]
    done = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, EntityStateError)]
    assert len(done) == 1 and len(done) + len(refused) == len(requests)
    # Every external ID still resolves to exactly one live entity, with one primary.
    live = await pool.fetch(
        "SELECT m.internal_id FROM id_mappings m JOIN entities e USING (internal_id) WHERE e.state = 'active'"
    )
    assert len(live) == await pool.fetchval("SELECT count(*) FROM id_mappings") == 8
    assert await pool.fetchval("SELECT count(*) FROM id_mappings WHERE is_primary") == 6


async def test_merge_chains_re_point_earlier_losers_at_the_last_survivor(
    store: MappingStore, pool: asyncpg.Pool
) -> None:
    await store.register_entities({"A": "User", "B": "User", "C": "User"})
    await store.merge("B", ["A"], idempotency_key="1", actor="ops")
    await store.merge("C", ["B"], idempotency_key="2", actor="ops")
    pointers = await pool.fetch(
        "SELECT internal_id, merged_into FROM entities ORDER BY internal_id"
    )
    assert [tuple(r) for r in pointers] == [("A", "C"), ("B", "C"), ("C", None)]


async def test_adding_a_second_primary_is_a_conflict_error(store: MappingStore) -> None:
    await store.register_entities({"a": "User"})
    row = await store.add_mapping("a", "D2", "p1")
    assert row.origin is Origin.PEER and row.row_id is not None
    with pytest.raises(ConflictError, match="already has a primary ID for a"):
        await store.add_mapping("a", "D2", "p2")


async def test_a_survivor_pending_create_gives_way_to_the_losers_account_in_one_statement(
    store: MappingStore, pool: asyncpg.Pool
) -> None:
    # Found by the store property test: the pending row must be gone before the loser's row moves
    # in as primary, whatever order PostgreSQL runs the statement's parts in.
    await store.register_entities({"S": "User", "L": "User"})
    await store.add_mapping("L", "D2", "l2")
    await store.add_mapping("S", "D2", None, state=MappingState.PENDING_CREATE)
    await pool.execute(
        "INSERT INTO outbox (domain_id, internal_id, kind) VALUES ('D2', 'S', 'provision')"
    )
    await store.merge("S", ["L"], idempotency_key="k", actor="ops")
    assert await _table(pool) == {("S", "D2", "l2", True, "active")}
    assert await pool.fetchval("SELECT state FROM outbox WHERE kind = 'provision'") == "cancelled"
