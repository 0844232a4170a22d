"""The tamper-evident audit log: the hash chain (pure), its trigger, tampering done directly in
PostgreSQL found at the first broken row, the commands, and the writers that must audit."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from broker.auditchain import GENESIS, AuditRow, ChainHead, digest, verify
from broker.auditlog import verify_database
from broker.cli import main
from broker.cli.audit import parse_since
from broker.db import apply_migrations, create_pool, load_migrations, query
from broker.domains import DomainStore
from broker.errors import InvalidValueError
from broker.events.keyring import KeyRing
from broker.secrets import SecretBox
from broker.tokens import TokenStore

T0 = datetime(2026, 12, 5, 8, 0, 0, 123456, tzinfo=UTC)


def chain(n: int) -> tuple[list[AuditRow], ChainHead]:
    """``n`` rows chained as the trigger chains them, and their head."""
    rows, previous = [], GENESIS
    for i in range(1, n + 1):
        row = AuditRow(
            id=10 + i,
            seq=i,
            at=T0 + timedelta(seconds=i),
            actor="cli:ops",
            action="merge",
            subject=f"e{i}",
            details_text=f'{{"n": {i}, "name": "Zoë \\"Q\\""}}',
            prev_hash=previous,
            hash=None,
        )
        row = dataclasses.replace(row, hash=digest(previous, row, i))
        rows.append(row)
        previous = row.hash  # type: ignore[assignment]
    return rows, ChainHead(n, previous)


# --------------------------------------------------------------------------- the pure chain


def test_an_intact_chain_verifies_to_its_head() -> None:
    rows, head = chain(5)
    assert verify(rows, head) == (5, None)
    assert verify([], ChainHead(0, GENESIS)) == (0, None)


def test_an_edited_row_is_named() -> None:
    rows, head = chain(5)
    rows[2] = dataclasses.replace(rows[2], details_text='{"n": 99}')
    intact, broken = verify(rows, head)
    assert intact == 2 and broken is not None
    assert broken.row_id == rows[2].id and "edited" in broken.reason


def test_a_deleted_row_is_named_by_the_row_after_it() -> None:
    rows, head = chain(5)
    del rows[1]
    intact, broken = verify(rows, head)
    assert intact == 1 and broken is not None
    assert broken.row_id == 13 and "deleted" in broken.reason


def test_two_rows_swapped_are_found_at_the_first() -> None:
    rows, head = chain(5)
    rows[1], rows[2] = rows[2], rows[1]
    _, broken = verify(rows, head)
    assert broken is not None and broken.row_id == rows[1].id


def test_a_row_renumbered_into_another_place_is_found() -> None:
    rows, head = chain(4)
    rows[1] = dataclasses.replace(rows[1], seq=3)  # someone swapped the positions of 2 and 3
    rows[2] = dataclasses.replace(rows[2], seq=2)
    rows[1], rows[2] = rows[2], rows[1]
    _, broken = verify(rows, head)
    assert broken is not None and broken.row_id == 13 and "moved" in broken.reason


def test_a_deleted_tail_is_found_from_the_head() -> None:
    rows, head = chain(5)
    intact, broken = verify(rows[:3], head)
    assert intact == 3 and broken is not None
    assert broken.row_id is None and "last 2 row(s) were deleted" in broken.reason


def test_a_row_without_a_hash_is_named() -> None:
    rows, head = chain(3)
    rows[0] = dataclasses.replace(rows[0], hash=None)
    _, broken = verify(rows, head)
    assert broken is not None and broken.row_id == 11 and "no hash" in broken.reason


def test_since_takes_a_time_or_a_duration_ago() -> None:
    now = datetime(2026, 12, 5, 12, tzinfo=UTC)
    assert parse_since(None, now) is None
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2026-12-01T08:00:00Z", now) == datetime(2026, 12, 1, 8, tzinfo=UTC)
    assert parse_since("2026-12-01", now) == datetime(2026, 12, 1, tzinfo=UTC)
    with pytest.raises(InvalidValueError, match="ISO 8601 time"):
        parse_since("yesterday", now)


# --------------------------------------------------------------------------- in PostgreSQL


async def write(pool: asyncpg.Pool, n: int, *, subject: str = "e") -> None:
    for i in range(n):
        await pool.execute(
            query("audit"),
            "cli:ops",
            "merge" if i % 2 else "split",
            f"{subject}{i}",
            {"i": i, "text": 'Zoë "quoted" \\ \n', "nested": {"b": [1, 2.5, None], "a": True}},
        )


async def tamper(pool: asyncpg.Pool, *statements: str) -> None:
    """Statements run past the log's append-only triggers, as someone with the rights could."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        for statement in statements:
            await conn.execute(statement)


async def ids(pool: asyncpg.Pool) -> list[int]:
    return [r["id"] for r in await pool.fetch("SELECT id FROM audit_log ORDER BY seq")]


async def test_the_database_chains_every_row_as_the_verifier_computes(pool: asyncpg.Pool) -> None:
    await write(pool, 6)
    assert await verify_database(pool) == (6, None)


async def test_concurrent_writers_make_one_chain(pool: asyncpg.Pool) -> None:
    await asyncio.gather(*(write(pool, 5, subject=f"w{w}-") for w in range(6)))
    assert await verify_database(pool) == (30, None)
    seqs = [r["seq"] for r in await pool.fetch("SELECT seq FROM audit_log ORDER BY seq")]
    assert seqs == list(range(1, 31))


async def test_the_log_refuses_changes_and_deletes(pool: asyncpg.Pool) -> None:
    await write(pool, 2)
    for statement in (
        "UPDATE audit_log SET actor = 'x'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await pool.execute(statement)


async def test_an_edit_in_postgresql_is_found_at_the_edited_row(pool: asyncpg.Pool) -> None:
    await write(pool, 5)
    third = (await ids(pool))[2]
    await tamper(
        pool, f"UPDATE audit_log SET details = details || '{{\"i\": 7}}' WHERE id = {third}"
    )
    intact, broken = await verify_database(pool)
    assert intact == 2 and broken is not None and broken.row_id == third
    assert "edited" in broken.reason


async def test_a_delete_in_postgresql_is_found_at_the_next_row(pool: asyncpg.Pool) -> None:
    await write(pool, 5)
    rows = await ids(pool)
    await tamper(pool, f"DELETE FROM audit_log WHERE id = {rows[1]}")
    intact, broken = await verify_database(pool)
    assert intact == 1 and broken is not None and broken.row_id == rows[2]


async def test_a_reorder_in_postgresql_is_found_at_the_first_moved_row(
    pool: asyncpg.Pool,
) -> None:
    await write(pool, 5)
    rows = await ids(pool)
    await tamper(
        pool,
        "UPDATE audit_log SET seq = -1 WHERE seq = 2",
        "UPDATE audit_log SET seq = 2 WHERE seq = 3",
        "UPDATE audit_log SET seq = 3 WHERE seq = -1",
    )
    intact, broken = await verify_database(pool)
    assert intact == 1 and broken is not None and broken.row_id == rows[2]


async def test_a_rewritten_chain_of_contents_and_links_is_found_from_the_head(
    pool: asyncpg.Pool,
) -> None:
    # Deleting the last rows leaves a chain that holds, but no longer reaches the head.
    await write(pool, 5)
    rows = await ids(pool)
    await tamper(pool, f"DELETE FROM audit_log WHERE id IN ({rows[3]}, {rows[4]})")
    intact, broken = await verify_database(pool)
    assert intact == 3 and broken is not None and broken.row_id is None
    assert "the last 2 row(s) were deleted" in broken.reason


async def test_rows_written_before_the_chain_are_chained_by_the_migration(fresh_db: str) -> None:
    before = [m for m in load_migrations() if m.version < 13]
    conn = await asyncpg.connect(fresh_db)
    try:
        await apply_migrations(conn, before)
        await conn.execute(
            "INSERT INTO audit_log (actor, action, subject, details) VALUES "
            "('cli:a', 'merge', 'e1', '{\"x\": 1}'), ('cli:b', 'split', NULL, '{}')"
        )
        await apply_migrations(conn)
    finally:
        await conn.close()
    pool = await create_pool(fresh_db, min_size=1, max_size=2)
    try:
        await write(pool, 1)
        assert await verify_database(pool) == (3, None)
    finally:
        await pool.close()


# --------------------------------------------------------------------------- the commands


@pytest.fixture
def broker_cli(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Awaitable[tuple[int, str, str]]]:
    """``broker ARGS`` in this process on the test's database: status, stdout, stderr."""
    monkeypatch.setenv("BROKER_DATABASE_URL", db_url)

    async def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = await asyncio.to_thread(main, list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return run


async def test_verify_says_intact_or_names_the_first_broken_row(
    pool: asyncpg.Pool, broker_cli: Callable[..., Awaitable[tuple[int, str, str]]]
) -> None:
    await write(pool, 3)
    status, _, err = await broker_cli("audit", "verify")
    assert status == 0 and "intact: 3 row(s)" in err
    second = (await ids(pool))[1]
    await tamper(pool, f"UPDATE audit_log SET actor = 'cli:someone-else' WHERE id = {second}")
    status, _, err = await broker_cli("audit", "verify")
    assert status == 1
    assert f"BROKEN at row {second}: its contents do not match its hash" in err


async def test_an_export_verifies_elsewhere_and_an_edit_in_it_is_found(
    pool: asyncpg.Pool,
    broker_cli: Callable[..., Awaitable[tuple[int, str, str]]],
    tmp_path: Path,
) -> None:
    await write(pool, 4)
    file = tmp_path / "audit.jsonl"
    status, _, err = await broker_cli("audit", "export", "--output", str(file))
    assert status == 0 and "exported 4 audit row(s)" in err
    lines = file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and "chain_head" in json.loads(lines[-1])
    assert len(json.loads(lines[0])["hash"]) == 64
    assert (await broker_cli("audit", "verify", "--file", str(file)))[0] == 0

    third = json.loads(lines[2])
    third["details"]["i"] = 42
    third["details_text"] = json.dumps(third["details"])
    lines[2] = json.dumps(third)
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    status, _, err = await broker_cli("audit", "verify", "--file", str(file))
    assert status == 1 and f"row {third['id']}" in err

    file.write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")  # cut short
    status, _, err = await broker_cli("audit", "verify", "--file", str(file))
    assert status == 1 and "without the chain head line" in err
    file.write_text("not json\n", encoding="utf-8")
    status, _, err = await broker_cli("audit", "verify", "--file", str(file))
    assert status == 1 and "line 1 is not a line of `broker audit export`" in err


async def test_list_filters_by_entity_domain_and_time(
    pool: asyncpg.Pool, broker_cli: Callable[..., Awaitable[tuple[int, str, str]]]
) -> None:
    await write(pool, 3)
    await pool.execute(query("audit"), "cli:ops", "token_issue", "P1", {"token": 1})
    await pool.execute(query("audit"), "cli:ops", "delivery_retry", "e9", {"domain": "P1"})
    status, out, _ = await broker_cli("audit", "list", "--entity", "e1", "--json")
    entries = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [e["subject"] for e in entries] == ["e1"]
    status, out, _ = await broker_cli("audit", "list", "--domain", "P1", "--json")
    assert [json.loads(line)["action"] for line in out.splitlines()] == [
        "token_issue",
        "delivery_retry",
    ]
    status, out, _ = await broker_cli("audit", "list", "--since", "1h")
    assert status == 0 and out.count("cli:ops") == 5
    status, out, _ = await broker_cli("audit", "list", "--since", "2999-01-01", "--json")
    assert status == 0 and out == ""
    status, _, err = await broker_cli("audit", "list", "--since", "last tuesday")
    assert status == 1 and "--since last tuesday: write an ISO 8601 time" in err


# --------------------------------------------------------------------------- what is audited


async def actions(pool: asyncpg.Pool) -> list[tuple[str, str | None, str]]:
    records = await pool.fetch("SELECT actor, action, subject FROM audit_log ORDER BY seq")
    return [(r["action"], r["subject"], r["actor"]) for r in records]


async def test_domain_token_and_key_changes_are_audited(pool: asyncpg.Pool) -> None:
    domains, tokens = DomainStore(pool), TokenStore(pool)
    await domains.add("H", kind="home", actor="cli:ops")
    await domains.add("P1", scim_url="https://p1.example.org/scim/v2", actor="cli:ops")
    await domains.set_scim_url("P1", "https://p1.example.net/scim/v2", actor="cli:ops")
    token, info = await tokens.issue("P1", actor="cli:ops")
    await tokens.revoke(info.id, actor="cli:ops")
    key = await KeyRing(pool, lambda: SecretBox(bytes(32))).rotate(actor="cli:ops")
    assert await actions(pool) == [
        ("domain_add", "H", "cli:ops"),
        ("domain_add", "P1", "cli:ops"),
        ("domain_update", "P1", "cli:ops"),
        ("token_issue", "P1", "cli:ops"),
        ("token_revoke", "P1", "cli:ops"),
        ("signing_key_add", None, "cli:ops"),
    ]
    details = [r["details"] for r in await pool.fetch("SELECT details FROM audit_log ORDER BY seq")]
    assert details[1]["scim_url"] == "https://p1.example.org/scim/v2"
    assert details[2] == {  # what changed: before and after
        "scim_url": ["https://p1.example.org/scim/v2", "https://p1.example.net/scim/v2"]
    }
    assert details[3]["token"] == info.id and details[4] == {"token": info.id}
    assert details[5] == {"kid": key.kid}
    assert token not in json.dumps(details)  # the token itself is never written down
    assert await verify_database(pool) == (6, None)


async def test_a_refused_change_writes_no_audit_entry(pool: asyncpg.Pool) -> None:
    domains, tokens = DomainStore(pool), TokenStore(pool)
    await domains.add("P1")
    with pytest.raises(Exception, match="exists already"):
        await domains.add("P1")
    with pytest.raises(Exception, match="no unrevoked token"):
        await tokens.revoke(12345)
    with pytest.raises(Exception, match="no domain"):
        await domains.set_scim_url("P9", "https://p9.example.org/scim/v2")
    assert [a for a, _, _ in await actions(pool)] == ["domain_add"]
