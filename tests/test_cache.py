"""The in-process mapping cache: answers reused, and dropped as soon as any process changes them."""

from __future__ import annotations

import asyncio

import asyncpg

from broker.mapping.cache import MappingCache, listen
from broker.mapping.store import MappingStore
from tests.conftest import QueryCounter


async def _setup(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "INSERT INTO domains (id, kind, push, scim_url) VALUES ('D2', 'peer', true, 'http://d2')"
    )
    store = MappingStore(pool)
    await store.register_entities({"S": "User", "L": "User"})
    await store.add_mapping("S", "D2", "s2")
    await store.add_mapping("L", "D2", "l2")


async def eventually(check, within: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.02)
    return False


def test_answers_from_before_an_invalidation_are_not_stored() -> None:
    cache = MappingCache()
    cache.enabled = True
    generation = cache.generation
    cache.invalidate(["L"])  # a change arrived while the query was in flight
    cache.put_inbound(generation, "D2", {"l2": "L"})
    assert cache.get_inbound("D2", ["l2"]) == {}
    cache.put_inbound(cache.generation, "D2", {"l2": "L"})
    assert cache.get_inbound("D2", ["l2"]) == {"l2": "L"}
    cache.invalidate(["L"])
    assert cache.get_inbound("D2", ["l2"]) == {}


def test_a_cache_nobody_keeps_true_answers_nothing() -> None:
    cache = MappingCache()
    cache.put_inbound(cache.generation, "D2", {"l2": "L"})
    assert cache.get_inbound("D2", ["l2"]) == {}


async def test_a_cached_answer_needs_no_query(pool: asyncpg.Pool, db_url: str) -> None:
    await _setup(pool)
    cache = MappingCache()
    async with listen(db_url, cache):
        single = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
        try:
            store = MappingStore(single, cache=cache)
            counter = QueryCounter()
            async with single.acquire() as conn:
                conn.add_query_logger(counter)
            assert await store.resolve_request("D2", ["l2"]) == ({"l2": "L"}, {})
            assert await store.resolve_outbound("D2", {"L": "User"}, mint=False) == {"L": "l2"}
            assert len(await counter.sent()) == 2
            assert await store.resolve_request("D2", ["l2"]) == ({"l2": "L"}, {})
            assert await store.resolve_outbound("D2", {"L": "User"}, mint=False) == {"L": "l2"}
            assert len(await counter.sent()) == 2
        finally:
            await single.close()


async def test_a_merge_in_another_process_reaches_this_cache(
    pool: asyncpg.Pool, db_url: str
) -> None:
    await _setup(pool)
    here, there = MappingCache(), MappingCache()
    async with listen(db_url, here), listen(db_url, there):
        reader, writer = MappingStore(pool, cache=here), MappingStore(pool, cache=there)
        assert (await reader.resolve_request("D2", ["l2"]))[0] == {"l2": "L"}
        assert await reader.resolve_outbound("D2", {"S": "User"}, mint=False) == {"S": "s2"}
        await writer.merge("S", ["L"], idempotency_key="k", actor="test")

        async def alias_resolves_to_survivor() -> bool:
            return (await reader.resolve_request("D2", ["l2"]))[0] == {"l2": "S"}

        assert await eventually(alias_resolves_to_survivor)
        # The merged loser is translated as the survivor now, not from a stale entry.
        assert await reader.resolve_outbound("D2", {"L": "User"}, mint=False) == {"L": "s2"}


async def test_this_process_sees_its_own_merge_at_once(pool: asyncpg.Pool, db_url: str) -> None:
    await _setup(pool)
    cache = MappingCache()
    async with listen(db_url, cache):
        store = MappingStore(pool, cache=cache)
        assert (await store.resolve_request("D2", ["l2"]))[0] == {"l2": "L"}
        await store.merge("S", ["L"], idempotency_key="k", actor="test")
        assert (await store.resolve_request("D2", ["l2"]))[0] == {"l2": "S"}


async def test_a_deletion_elsewhere_makes_the_id_unknown_here(
    pool: asyncpg.Pool, db_url: str
) -> None:
    await _setup(pool)
    here = MappingCache()
    async with listen(db_url, here):
        reader = MappingStore(pool, cache=here)
        assert (await reader.resolve_request("D2", ["s2"]))[0] == {"s2": "S"}
        await pool.execute("UPDATE entities SET state = 'deleted' WHERE internal_id = 'S'")

        async def gone() -> bool:
            return (await reader.resolve_request("D2", ["s2"]))[0] == {}

        assert await eventually(gone)


async def test_the_cache_is_off_while_the_listening_connection_is_down(
    pool: asyncpg.Pool, db_url: str
) -> None:
    await _setup(pool)
    cache = MappingCache()
    async with listen(db_url, cache, retry_seconds=0.5):
        assert cache.enabled
        await pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid() AND datname = current_database()"
        )

        async def back_on() -> bool:
            return cache.enabled

        assert await eventually(lambda: asyncio.sleep(0, result=not cache.enabled))
        assert await eventually(back_on)
