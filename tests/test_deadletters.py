"""Dead letters in bulk: ``broker deliveries retry|discard --domain D [--all|--since T]`` and the
admin API's ``/admin/domains/{domain}/dead-letters``: a count, a confirmation, batches each
audited, and refusals (no window, an unknown domain, a time that is none) that change nothing."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.admin.api import Admin, create_admin_app
from broker.errors import InvalidValueError, NotFoundError
from broker.mapping.store import MappingStore
from broker.propagation.journal import Journal
from broker.propagation.outbox import (
    count_dead_letters,
    dead_letter_window,
    settle_dead_letters,
)
from broker.since import parse_since
from broker.tokens import TokenStore

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", NOW - timedelta(hours=2)),
        ("90s", NOW - timedelta(seconds=90)),
        ("7d", NOW - timedelta(days=7)),
        ("2026-12-05T10:00:00Z", datetime(2026, 12, 5, 10, 0, tzinfo=UTC)),
        ("2026-12-05T11:00:00+01:00", datetime(2026, 12, 5, 10, 0, tzinfo=UTC)),
        ("2026-12-05", datetime(2026, 12, 5, tzinfo=UTC)),
    ],
)
def test_since_reads_iso_8601_and_times_ago(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2x", "-2h", "2026-13-01", "2027-01-01"])
def test_since_refuses_what_is_no_past_time_and_names_the_forms(text: str) -> None:
    with pytest.raises(InvalidValueError, match="ISO 8601"):
        parse_since(text, NOW)


def test_a_bulk_action_needs_all_or_since_and_not_both() -> None:
    with pytest.raises(InvalidValueError, match=r"--all .* or --since"):
        dead_letter_window(everything=False, since=None, now=NOW)
    with pytest.raises(InvalidValueError, match="not both"):
        dead_letter_window(everything=True, since="2h", now=NOW)
    assert dead_letter_window(everything=True, since=None, now=NOW) is None
    assert dead_letter_window(everything=False, since="1h", now=NOW) == NOW - timedelta(hours=1)


async def _dead(
    pool: asyncpg.Pool, domain: str, entity: str, minutes_ago: float, kind: str = "sync"
) -> int:
    delivery_id: int = await pool.fetchval(
        """INSERT INTO outbox (domain_id, internal_id, kind, state, attempts, last_error,
                               updated_at, sealed_values)
           VALUES ($1, $2, $3, 'dead', 7, '{"reason": "HTTP 403"}',
                   now() - make_interval(mins => $4), CASE WHEN $2 = 'E9' THEN '\\x01'::bytea END)
           RETURNING id""",
        domain,
        entity,
        kind,
        minutes_ago,
    )
    return delivery_id


async def _states(pool: asyncpg.Pool) -> dict[int, str]:
    return {r["id"]: r["state"] for r in await pool.fetch("SELECT id, state FROM outbox")}


@pytest.fixture
async def federation(pool: asyncpg.Pool) -> dict[str, list[int]]:
    """P1 with three letters dead for hours and two dead for minutes, P2 with one, and a
    pending delivery toward P1 (nothing for a bulk action)."""
    await pool.execute(
        "INSERT INTO domains (id, kind, push, scim_url) VALUES "
        "('H', 'home', false, NULL), ('P1', 'peer', true, 'http://p1'), "
        "('P2', 'peer', true, 'http://p2')"
    )
    await pool.execute(
        "INSERT INTO entities (internal_id, resource_type) "
        "SELECT 'E' || n, 'User' FROM generate_series(1, 9) n"
    )
    old = [await _dead(pool, "P1", f"E{n}", 180) for n in (1, 2, 3)]
    recent = [await _dead(pool, "P1", f"E{n}", 10, "move_memberships") for n in (4, 5)]
    other = [await _dead(pool, "P2", "E1", 10)]
    pending = await pool.fetchval(
        "INSERT INTO outbox (domain_id, internal_id, kind) VALUES ('P1', 'E6', 'sync') RETURNING id"
    )
    return {"old": old, "recent": recent, "other": other, "pending": [pending]}


async def test_retry_since_takes_only_the_recent_dead_letters_of_the_domain_batch_by_batch(
    pool: asyncpg.Pool, federation: dict[str, list[int]]
) -> None:
    letters = await count_dead_letters(pool, "P1", datetime.now(UTC) - timedelta(hours=1))
    assert letters.count == 2
    seen: list[int] = []
    settled = await settle_dead_letters(
        pool, letters, "retry", "cli:ops", batch=1, progress=seen.append
    )
    assert settled.count == 2 and seen == [1, 2]
    states = await _states(pool)
    assert all(states[i] == "pending" for i in federation["recent"])
    assert all(states[i] == "dead" for i in federation["old"] + federation["other"])
    attempts = await pool.fetch(
        "SELECT attempts FROM outbox WHERE id = ANY($1::bigint[])", federation["recent"]
    )
    assert {r["attempts"] for r in attempts} == {0}
    audit = await pool.fetch(
        "SELECT actor, action, details FROM audit_log WHERE action = 'deliveries_retry' ORDER BY id"
    )
    assert [r["details"]["deliveries"] for r in audit] == [[i] for i in federation["recent"]]
    assert {r["actor"] for r in audit} == {"cli:ops"}


async def test_discard_all_cancels_every_dead_letter_of_the_domain_and_keeps_them(
    pool: asyncpg.Pool, federation: dict[str, list[int]]
) -> None:
    letters = await count_dead_letters(pool, "P1", None)
    assert letters.count == 5
    settled = await settle_dead_letters(pool, letters, "discard", "cli:ops")
    assert settled.count == 5
    states = await _states(pool)
    assert {states[i] for i in federation["old"] + federation["recent"]} == {"cancelled"}
    assert states[federation["other"][0]] == "dead"
    assert states[federation["pending"][0]] == "pending"
    (audit,) = await pool.fetch("SELECT details FROM audit_log WHERE action = 'deliveries_discard'")
    assert audit["details"]["count"] == 5


async def test_a_dead_sync_of_an_entity_with_a_pending_sync_is_superseded_not_a_conflict(
    pool: asyncpg.Pool, federation: dict[str, list[int]]
) -> None:
    """An entity has one pending sync per peer (a unique index): retrying a dead one beside it
    would fail the whole batch. It is cancelled instead, and a password it carried is named."""
    dead_beside_pending = await _dead(pool, "P1", "E6", 5)
    with_password = await _dead(pool, "P1", "E9", 5)
    newer_with_password = await _dead(pool, "P1", "E9", 4)
    letters = await count_dead_letters(pool, "P1", None)
    settled = await settle_dead_letters(pool, letters, "retry", "cli:ops")
    assert settled.count == 8
    assert settled.superseded == [dead_beside_pending, with_password]
    assert settled.passwords_lost == [with_password]
    states = await _states(pool)
    assert states[dead_beside_pending] == "cancelled" and states[with_password] == "cancelled"
    assert states[newer_with_password] == "pending"
    sealed = await pool.fetchval("SELECT sealed_values FROM outbox WHERE id = $1", with_password)
    assert sealed is None


async def test_an_unknown_domain_is_refused(pool: asyncpg.Pool) -> None:
    with pytest.raises(NotFoundError, match="broker domain list"):
        await count_dead_letters(pool, "nope", None)


async def _cli(db_url: str, *args: str, answer: str | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker.cli",
        "deliveries",
        *args,
        env={**os.environ, "BROKER_DATABASE_URL": db_url},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate((answer or "").encode())
    return process.returncode or 0, out.decode()


async def test_the_cli_counts_asks_and_changes_nothing_unless_told_yes(
    db_url: str, pool: asyncpg.Pool, federation: dict[str, list[int]]
) -> None:
    before = await _states(pool)
    code, out = await _cli(db_url, "retry", "--domain", "P1", "--all", answer="n\n")
    assert code == 1
    assert "5 dead letters toward P1 will be retried" in out and "Continue? [y/N]" in out
    assert "nothing changed" in out
    assert await _states(pool) == before
    code, out = await _cli(db_url, "retry", "--domain", "P1", "--since", "1h", answer="y\n")
    assert code == 0, out
    assert "2 dead letters toward P1 that died since" in out and "2 of 2" in out
    code, out = await _cli(db_url, "discard", "--domain", "P1", "--all", "--yes")
    assert code == 0, out
    assert "3 dead letters toward P1 discarded" in out and "Continue" not in out
    states = await _states(pool)
    assert {states[i] for i in federation["old"]} == {"cancelled"}
    assert {states[i] for i in federation["recent"]} == {"pending"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--domain", "P1"), "needs --all"),
        (("--domain", "P1", "--all", "--since", "2h"), "not both"),
        (("--domain", "P1", "--since", "yesterday"), "ISO 8601"),
        (("--all",), "--domain D"),
        (("7", "--domain", "P1", "--all"), "not both"),
        (("--domain", "nope", "--all", "--yes"), "there is no domain nope"),
    ],
)
async def test_the_cli_refuses_bad_input_with_one_line_and_changes_nothing(
    db_url: str,
    pool: asyncpg.Pool,
    federation: dict[str, list[int]],
    args: tuple[str, ...],
    message: str,
) -> None:
    before = await _states(pool)
    code, out = await _cli(db_url, "retry", *args)
    assert code == 1, out
    assert message in out
    assert "Traceback" not in out
    assert await _states(pool) == before


@pytest.fixture
async def admin_client(
    pool: asyncpg.Pool, federation: dict[str, list[int]]
) -> AsyncIterator[tuple[TestClient[object, object], dict[str, str]]]:
    token, _ = await TokenStore(pool).issue("H", scopes=["admin"])
    admin = Admin(pool, MappingStore(pool), None, Journal(pool, None))
    async with TestClient(TestServer(create_admin_app(admin))) as client:
        yield client, {"Authorization": f"Bearer {token}"}


async def test_the_admin_api_counts_then_settles_with_the_confirmed_count(
    pool: asyncpg.Pool,
    federation: dict[str, list[int]],
    admin_client: tuple[TestClient[object, object], dict[str, str]],
) -> None:
    client, auth = admin_client
    counted = await client.get("/admin/domains/P1/dead-letters?since=1h", headers=auth)
    assert counted.status == 200
    assert (await counted.json())["count"] == 2
    stale = await client.post(
        "/admin/domains/P1/dead-letters/retry", json={"all": True, "expected": 2}, headers=auth
    )
    assert stale.status == 409 and "5 dead letters match now" in (await stale.json())["detail"]
    retried = await client.post(
        "/admin/domains/P1/dead-letters/retry", json={"since": "1h", "expected": 2}, headers=auth
    )
    assert retried.status == 200
    assert (await retried.json())["count"] == 2
    states = await _states(pool)
    assert {states[i] for i in federation["recent"]} == {"pending"}
    assert {states[i] for i in federation["old"]} == {"dead"}


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/admin/domains/P1/dead-letters/retry", {}, 400),
        ("/admin/domains/P1/dead-letters/discard", {"all": True, "since": "1h"}, 400),
        ("/admin/domains/P1/dead-letters/discard", {"since": "soon"}, 400),
        ("/admin/domains/P1/dead-letters/discard", {"all": "yes"}, 400),
        ("/admin/domains/nope/dead-letters/discard", {"all": True}, 404),
    ],
)
async def test_the_admin_api_refuses_bad_input_with_a_scim_error_and_changes_nothing(
    pool: asyncpg.Pool,
    federation: dict[str, list[int]],
    admin_client: tuple[TestClient[object, object], dict[str, str]],
    path: str,
    body: dict[str, object],
    status: int,
) -> None:
    client, auth = admin_client
    before = await _states(pool)
    response = await client.post(path, json=body, headers=auth)
    assert response.status == status
    error = await response.json()
    assert error["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    assert await _states(pool) == before
    unauthenticated = await client.post(path, json={"all": True})
    assert unauthenticated.status == 401
