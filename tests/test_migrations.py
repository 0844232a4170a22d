"""The migration runner: in order, once, under a lock, and refusing a migration changed after the fact."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import asyncpg
import pytest

from broker.db import _QUERIES as NAMED_QUERIES
from broker.db import (
    SQL_DIR,
    Migration,
    MigrationError,
    apply_migrations,
    load_migrations,
    migration_status,
    query,
)

CATALOG = """
SELECT 'column' AS kind, table_name || '.' || column_name AS name,
       concat_ws(' ', data_type, is_nullable, column_default, is_identity) AS definition
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'constraint', conrelid::regclass || '.' || conname, pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index', indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'trigger', tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'function', proname, pg_get_functiondef(oid) FROM pg_proc WHERE pronamespace = 'public'::regnamespace
ORDER BY 1, 2
"""


async def catalog(url: str) -> list[tuple[str, str, str]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(CATALOG)]
    finally:
        await conn.close()


async def test_applying_every_migration_yields_the_schema_the_code_expects(
    db_url: str, fresh_db: str
) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        await conn.execute((SQL_DIR / "schema.sql").read_text())
    finally:
        await conn.close()
    migrated, expected = await catalog(db_url), await catalog(fresh_db)
    assert migrated == expected
    assert ("index", "id_mappings_one_primary") in {(kind, name) for kind, name, _ in migrated}


async def test_every_named_query_prepares_against_the_migrated_schema(pool: asyncpg.Pool) -> None:
    # Every table, column and parameter type a query names exists: the code and schema agree.
    assert len(NAMED_QUERIES) > 10
    async with pool.acquire() as conn, conn.transaction():
        # The mapping import's queries name its staging table, a temporary one (ON COMMIT DROP).
        await conn.execute(query("import_staging"))
        for name in NAMED_QUERIES:
            await conn.prepare(query(name))


async def test_migrations_apply_in_order_once_and_are_recorded(fresh_db: str) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        applied = await apply_migrations(conn)
        assert [m.version for m in applied] == [m.version for m in load_migrations()]
        assert await apply_migrations(conn) == []
        recorded = await conn.fetch(
            "SELECT version, checksum FROM schema_migrations ORDER BY version"
        )
        assert [(r["version"], r["checksum"]) for r in recorded] == [
            (m.version, m.checksum) for m in load_migrations()
        ]
        assert (await migration_status(conn)).pending == []
    finally:
        await conn.close()


async def test_concurrent_starts_apply_each_migration_once(fresh_db: str) -> None:
    conns = [await asyncpg.connect(fresh_db) for _ in range(4)]
    try:
        results = await asyncio.gather(*(apply_migrations(c) for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, 0, len(load_migrations())]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == len(
            load_migrations()
        )
    finally:
        for c in conns:
            await c.close()


async def test_a_migration_changed_after_it_was_applied_is_refused_with_a_clear_message(
    db_url: str,
) -> None:
    changed = [
        dataclasses.replace(m, sql=m.sql + "\n-- an edit\n") if m.version == 1 else m
        for m in load_migrations()
    ]
    conn = await asyncpg.connect(db_url)
    try:
        with pytest.raises(
            MigrationError,
            match=r"0001_initial\.sql changed after it was applied.*new numbered file",
        ):
            await apply_migrations(conn, changed)
    finally:
        await conn.close()


async def test_a_database_migrated_by_a_newer_broker_is_refused(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, '9999_future.sql', 'x')"
        )
        with pytest.raises(MigrationError, match="newer broker"):
            await apply_migrations(conn)
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_nothing_behind(fresh_db: str) -> None:
    broken = [
        *load_migrations(),
        Migration(9999, "9999_broken.sql", "CREATE TABLE half (x int); SELECT 1/0;"),
    ]
    conn = await asyncpg.connect(fresh_db)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await apply_migrations(conn, broken)
        # The good ones committed on their own; the broken one neither created its table nor was recorded.
        assert (
            await conn.fetchval("SELECT max(version) FROM schema_migrations")
            == load_migrations()[-1].version
        )
        assert await conn.fetchval("SELECT to_regclass('half')") is None
    finally:
        await conn.close()


def test_migration_files_are_numbered_and_schema_sql_is_not_one(tmp_path: Path) -> None:
    assert load_migrations()[0].name == "0001_initial.sql"
    (tmp_path / "0001_a.sql").write_text("SELECT 1")
    (tmp_path / "0001_b.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="share a number"):
        load_migrations(tmp_path)
    (tmp_path / "0001_b.sql").unlink()
    (tmp_path / "2_bad-name.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="rename it"):
        load_migrations(tmp_path)
