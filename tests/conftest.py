"""Test fixtures: one real PostgreSQL per session, one database per test cloned from a template.

The server is an embedded PostgreSQL in a temporary directory, or the one named by
``BROKER_TEST_DATABASE_URL`` (a role that may create databases).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from broker.db import EmbeddedPostgres, apply_migrations, create_pool

TEMPLATE = f"broker_template_{uuid.uuid4().hex[:8]}"
# The sealing key of the brokers the tests start on a database URL (which makes none of its own):
# tests.scim_support.TEST_KEY_ENV names it.
os.environ.setdefault("TEST_BROKER_KEY", "k" * 43)
_counter = itertools.count()


def with_database(url: str, database: str) -> str:
    """The same server URL naming another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """URL of the session's PostgreSQL server (its maintenance database)."""
    url = os.environ.get("BROKER_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="broker-test-pg-") as tmp:
        embedded = EmbeddedPostgres(Path(tmp) / "data")
        with embedded.running() as server_url:
            yield server_url


async def _admin(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url)


@pytest.fixture(scope="session")
async def template_db(pg_server: str) -> AsyncIterator[str]:
    """A database with every migration applied, cloned for each test."""
    admin = await _admin(pg_server)
    try:
        if os.environ.get("BROKER_TEST_DATABASE_URL") is None:
            # A throw-away server: durability buys nothing here, speed does.
            await admin.execute("ALTER SYSTEM SET fsync = off")
            await admin.execute("ALTER SYSTEM SET synchronous_commit = off")
            await admin.execute("ALTER SYSTEM SET full_page_writes = off")
            await admin.execute("SELECT pg_reload_conf()")
        await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
        conn = await asyncpg.connect(with_database(pg_server, TEMPLATE))
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        yield TEMPLATE
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def fresh_db(pg_server: str) -> AsyncIterator[str]:
    """URL of a new, empty database (no migrations), dropped after the test."""
    name = f"broker_test_{os.getpid()}_{next(_counter)}"
    admin = await _admin(pg_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield with_database(pg_server, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def db_url(pg_server: str, template_db: str) -> AsyncIterator[str]:
    """URL of a migrated database of this test's own, cloned from the template."""
    name = f"broker_test_{os.getpid()}_{next(_counter)}"
    admin = await _admin(pg_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}" STRATEGY FILE_COPY')
        yield with_database(pg_server, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(db_url, min_size=1, max_size=5)
    try:
        yield pool
    finally:
        await pool.close()


class QueryCounter:
    """Counts the statements a connection sends (asyncpg's query logger)."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    def __call__(self, record: asyncpg.connection.LoggedQuery) -> None:
        if "RESET ALL" not in record.query:  # the pool's own clean-up on release
            self.queries.append(record.query)

    async def clear(self) -> None:
        """Forget what was sent so far. asyncpg calls its query loggers soon after each
        statement (``loop.call_soon``), not during it: those calls come in first."""
        await asyncio.sleep(0)
        self.queries.clear()

    async def sent(self) -> list[str]:
        """What was sent since the last :meth:`clear`, the last statement's call come in."""
        await asyncio.sleep(0)
        return self.queries


@pytest.fixture
async def counted_pool(db_url: str) -> AsyncIterator[tuple[asyncpg.Pool, QueryCounter]]:
    """A one-connection pool whose statements (after set-up) are counted."""
    counter = QueryCounter()
    pool = await create_pool(db_url, min_size=1, max_size=1)
    async with pool.acquire() as conn:
        conn.add_query_logger(counter)
    try:
        yield pool, counter
    finally:
        await pool.close()


from tests.propagation_support import (  # noqa: E402,F401  (peers' and own homes' servers)
    homes_server,
    peer_server,
)
from tests.scim_support import (  # noqa: E402,F401
    home,  # the session's real home SCIM server
    no_home_id_reaches_a_domain,  # autouse: a leak fails the test that caused it
)
