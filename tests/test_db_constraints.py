"""The invariants of DESIGN section 2 are PostgreSQL constraints: the database refuses what breaks them."""

from __future__ import annotations

import asyncpg
import pytest


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> asyncpg.Connection:
    async with pool.acquire() as connection:
        await connection.execute(
            """
            INSERT INTO domains (id, kind) VALUES ('D1', 'peer'), ('D2', 'peer');
            INSERT INTO entities (internal_id, resource_type) VALUES ('S', 'User'), ('L', 'User');
            INSERT INTO id_mappings (internal_id, domain_id, external_id, is_primary, origin, correlation_handle)
            VALUES ('S', 'D2', 'ff487230b3a0', true, 'peer', 'h1');
            """
        )
        yield connection


INSERT = """
INSERT INTO id_mappings (internal_id, domain_id, external_id, is_primary, origin, state, correlation_handle)
VALUES ($1, $2, $3, $4, 'peer', $5, $6)
"""


async def test_the_database_refuses_a_second_primary_for_one_entity_in_one_domain(
    conn: asyncpg.Connection,
) -> None:
    with pytest.raises(asyncpg.UniqueViolationError) as caught:
        await conn.execute(INSERT, "S", "D2", "41206cc97c8b", True, "active", "h2")
    assert caught.value.constraint_name == "id_mappings_one_primary"


async def test_a_second_row_of_the_same_entity_in_a_domain_is_fine_as_an_alias(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute(INSERT, "S", "D2", "41206cc97c8b", False, "deletion_required", "h2")
    assert await conn.fetchval("SELECT count(*) FROM id_mappings WHERE internal_id = 'S'") == 2


async def test_the_database_refuses_a_duplicate_external_id_in_a_domain(
    conn: asyncpg.Connection,
) -> None:
    with pytest.raises(asyncpg.UniqueViolationError) as caught:
        await conn.execute(INSERT, "L", "D2", "ff487230b3a0", True, "active", "h2")
    assert caught.value.constraint_name == "id_mappings_external_id_unique"


async def test_the_same_external_id_in_another_domain_is_another_row(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute(INSERT, "L", "D1", "ff487230b3a0", True, "active", "h2")


@pytest.mark.parametrize(
    ("args", "constraint"),
    [
        (("L", "D2", "x", True, "deletion_required", "h2"), "id_mappings_alias_state"),
        (("L", "D2", "x", False, "active", "h2"), "id_mappings_alias_state"),
        (("L", "D2", None, True, "active", "h2"), "id_mappings_external_id_present"),
        (("L", "D2", "x", True, "pending_create", "h2"), "id_mappings_external_id_present"),
        (("L", "D2", "x", False, "lost", "h2"), "id_mappings_state_check"),
    ],
)
async def test_the_database_refuses_rows_whose_flags_contradict_their_state(
    conn: asyncpg.Connection, args: tuple[object, ...], constraint: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await conn.execute(INSERT, *args)
    assert caught.value.constraint_name == constraint


async def test_rows_need_a_known_entity_and_domain(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute(INSERT, "nobody", "D2", "x", True, "active", "h2")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute(INSERT, "L", "D9", "x", True, "active", "h2")


async def test_a_merged_entity_names_its_survivor_and_only_then(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("UPDATE entities SET state = 'merged' WHERE internal_id = 'L'")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute(
            "UPDATE entities SET state = 'merged', merged_into = 'X' WHERE internal_id = 'L'"
        )
    await conn.execute(
        "UPDATE entities SET state = 'merged', merged_into = 'S' WHERE internal_id = 'L'"
    )


async def test_there_is_one_home_domain(conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO domains (id, kind) VALUES ('H', 'home')")
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute("INSERT INTO domains (id, kind) VALUES ('H2', 'home')")
