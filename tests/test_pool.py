"""The broker's connection pool (broker/db.py, _Pool): asyncpg's, returning an idle connection
without a task of its own, and anything else as asyncpg does (rolled back, cancellation waited
for)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from broker.db import create_pool
from tests.waiting import until


@pytest.fixture
async def one(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool of one connection: what is released is what the next acquire gets."""
    pool = await create_pool(db_url, min_size=1, max_size=1)
    try:
        yield pool
    finally:
        await pool.close()


async def test_an_idle_connection_goes_back_without_a_task(one: asyncpg.Pool) -> None:
    loop = asyncio.get_running_loop()
    started: list[Any] = []
    factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        started.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting)
    try:
        for n in range(50):
            assert await one.fetchval("SELECT $1::int", n) == n
    finally:
        loop.set_task_factory(factory)
    assert started == []  # asyncpg's own release started one per statement (asyncio.shield)
    assert one.get_size() == 1 and one.get_idle_size() == 1


async def test_a_connection_released_in_a_transaction_is_rolled_back(one: asyncpg.Pool) -> None:
    await one.execute("CREATE TABLE pool_probe (n int)")
    conn = await one.acquire()
    transaction = conn.transaction()
    await transaction.start()
    await conn.execute("INSERT INTO pool_probe VALUES (1)")
    await one.release(conn)
    async with one.acquire() as again:
        assert not again.is_in_transaction()
        assert await again.fetchval("SELECT count(*) FROM pool_probe") == 0


async def test_a_cancelled_statement_leaves_the_connection_usable(
    one: asyncpg.Pool, db_url: str
) -> None:
    slow = asyncio.ensure_future(one.fetchval("SELECT pg_sleep(30)"))
    watcher = await asyncpg.connect(db_url)
    try:
        await until(
            lambda: watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
                " AND state = 'active'"
            ),
            "the statement to run",
        )
    finally:
        await watcher.close()
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert await one.fetchval("SELECT 7") == 7  # the cancel was waited for, not left to clash
    assert one.get_size() == 1
