"""Each entity's history (writes, deliveries with the peer's answer, SETs, merges, splits, audit
entries) kept past the outbox purge, and dry runs of merge and split that change nothing; with a
real home, real push peers and the broker's own worker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from broker.app import DELIVERER
from broker.cli import main
from broker.db import query
from broker.errors import InvalidValueError
from broker.history import Target, parse_target
from broker.tokens import TokenStore
from tests.propagation_support import (
    FAST,
    Gate,
    admin,
    admin_call,
    federation,
    gate,
    home_tool,
    peer_id,
    quiesce,
    tenant,
)
from tests.scim_support import Broker, Home, new_user, unique
from tests.waiting import until

CLI = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
async def federated(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Broker, Gate]]:
    """Home, push peers P1 and P2 (P2 behind a gate), the broker."""
    p1, p2 = tenant(peer_server, "p1"), tenant(peer_server, "p2")
    settings = FAST.model_copy(update={"retention": 0, "done_retention": 0.001})
    async with gate(p2) as front:
        async for broker in federation(
            db_url, home, {"P1": p1.url, "P2": front.url}, monkeypatch, peer_server.token, settings
        ):
            yield broker, front


@pytest.fixture
def broker_cli(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> CLI:
    """``broker ARGS`` in this process on the test's database: status, stdout, stderr."""
    monkeypatch.setenv("BROKER_DATABASE_URL", db_url)

    async def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = await asyncio.to_thread(main, list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return run


async def person(broker: Broker, display: str) -> dict[str, Any]:
    status, user = await home_tool(
        broker, "POST", "/Users", new_user(unique("jsmith"), displayName=display)
    )
    assert status == 201, user
    return user


def cells(text: str) -> list[tuple[str, ...]]:
    """The rows of the tables in ``text`` (lines drawn ``| a | b |``), stripped."""
    return [
        tuple(c.strip() for c in line.strip().strip("|").split("|"))
        for line in text.splitlines()
        if line.startswith("| ")
    ]


def events(history: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    return [(e["kind"], e["domain"], e["status"]) for e in history["events"]]


async def snapshot(pool: asyncpg.Pool) -> dict[str, Any]:
    """Everything a merge or split writes."""
    return {
        table: [tuple(r) for r in await pool.fetch(f"SELECT * FROM {table} ORDER BY 1")]
        for table in (
            "id_mappings",
            "entities",
            "outbox",
            "operations",
            "audit_log",
            "entity_history",
            "home_changes",
        )
    }


# --------------------------------------------------------------------------- pure


def test_a_target_is_an_internal_id_unless_a_known_domain_precedes_the_colon() -> None:
    assert parse_target("abc", {"P1"}) == Target(internal_id="abc")
    assert parse_target("P1:x:y", {"P1"}) == Target(domain="P1", external_id="x:y")
    assert parse_target("urn:x", {"P1"}) == Target(internal_id="urn:x")
    for bad, message in (("P1:", "after the colon"), (":x", "before the colon"), (" ", "name")):
        with pytest.raises(InvalidValueError, match=message):
            parse_target(bad, {"P1"})


# --------------------------------------------------------------------------- history


async def test_the_history_lists_writes_deliveries_merges_and_audit_past_the_outbox_purge(
    federated: tuple[Broker, Gate],
) -> None:
    broker, front = federated
    jsmith, johns = await person(broker, "JSmith"), await person(broker, "JohnS")
    await quiesce(broker)
    l1 = await peer_id(broker, "P1", johns["id"])
    front.failures.append((503, {"Retry-After": "0"}))  # P2 refuses the merge's first task once
    status, op, _ = await admin_call(
        broker,
        "POST",
        "/admin/merges",
        {"survivor": jsmith["id"], "losers": [johns["id"]], "idempotency_key": unique("m")},
    )
    assert status == 202, op
    await quiesce(broker)

    # The outbox purge takes the finished deliveries; the history keeps them.
    await until(lambda: broker.app[DELIVERER].purge(), "the purge takes the done deliveries")
    assert await broker.pool.fetchval("SELECT count(*) FROM outbox WHERE state = 'done'") == 0

    # The loser, named by its old ID in P1 (now the survivor's alias, or gone): the survivor's
    # history, with the loser's before the merge.
    status, history = await admin(broker, "GET", f"/admin/entities/{jsmith['id']}/history")
    assert status == 200, history
    assert history["internalId"] == jsmith["id"] and history["merged"] == [johns["id"]]
    seen = events(history)
    assert ("write", "H", "create") in seen or ("write", None, "create") in seen
    assert ("delivery", "P1", "done") in seen and ("delivery", "P2", "done") in seen
    assert ("merge", None, "survivor") in seen and ("merge", None, "loser") in seen
    assert ("audit", None, "merge") in seen
    retry = next(e for e in history["events"] if e["status"] == "retry")
    assert retry["domain"] == "P2" and retry["details"]["answer"]["status"] == 503
    assert retry["details"]["task"] in ("move_memberships", "delete_alias")
    by_entity = {e["entity"] for e in history["events"]}
    assert by_entity == {jsmith["id"], johns["id"]}
    times = [e["at"] for e in history["events"]]
    assert times == sorted(times)

    # The same through a domain's external ID, and the loser's own ID, on the command line.
    status, again = await admin(broker, "GET", f"/admin/entities/P1:{l1}/history")
    assert status in (200, 404)  # the alias is gone once P1 deleted it (no retention here)
    status, again = await admin(
        broker, "GET", f"/admin/entities/P1:{await peer_id(broker, 'P1', jsmith['id'])}/history"
    )
    assert status == 200 and events(again) == seen
    status, error = await admin(broker, "GET", "/admin/entities/P1:nope/history")
    assert status == 404 and "P1 has no external ID 'nope'" in error["detail"]
    status, error = await admin(broker, "GET", "/admin/entities/P1:/history")
    assert status == 400 and "after the colon" in error["detail"]
    status, error = await admin(broker, "GET", "/admin/entities/never-seen/history")
    assert status == 404 and "knows no entity 'never-seen'" in error["detail"]
    status, error = await admin(broker, "GET", f"/admin/entities/{jsmith['id']}/history?limit=x")
    assert status == 400 and error["scimType"] == "invalidValue"
    status, _ = await admin(
        broker, "GET", f"/admin/entities/{jsmith['id']}/history", token=broker.tokens["P1"]
    )
    assert status in (401, 403)


async def test_the_history_command_and_its_bad_input(
    federated: tuple[Broker, Gate], broker_cli: CLI
) -> None:
    broker, _front = federated
    jsmith = await person(broker, "JSmith")
    await quiesce(broker)
    s1 = await peer_id(broker, "P1", jsmith["id"])
    status, out, _ = await broker_cli("history", f"P1:{s1}")
    assert status == 0, out
    assert "| Internal Entity ID " in out and "| External Domain ID |" in out and s1 in out
    assert "| delivery | P1" in out and "| done " in out
    status, out, _ = await broker_cli("history", jsmith["id"], "--json")
    document = json.loads(out)
    assert status == 0 and ("delivery", "P2", "done") in events(document)
    for bad, message in (
        ("P1:", "with the external ID after the colon"),
        (":abc", "with the domain before the colon"),
        ("P1:nope", "P1 has no external ID 'nope'"),
        ("no-such-entity", "knows no entity 'no-such-entity'"),
    ):
        status, _, err = await broker_cli("history", bad)
        assert status == 1 and message in err, err


async def test_history_is_purged_after_its_own_retention(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "INSERT INTO entity_history (internal_id, kind, status, at) VALUES "
        "('e1', 'write', 'create', now() - interval '31 days'), "
        "('e1', 'write', 'patch', now() - interval '29 days')"
    )
    assert await pool.execute(query("purge_history"), 30 * 86400.0, 5000) == "DELETE 1"
    assert await pool.fetchval("SELECT status FROM entity_history") == "patch"


async def test_a_settled_set_is_in_its_entity_s_history(pool: asyncpg.Pool) -> None:
    await pool.execute("INSERT INTO domains (id, kind) VALUES ('P1', 'peer')")
    await pool.execute(
        "INSERT INTO entities (internal_id, resource_type) VALUES ('e1', 'User'), ('e2', 'User')"
    )
    await pool.execute(
        "INSERT INTO home_changes (txn, internal_id, kinds) VALUES "
        "(gen_random_uuid(), 'e1', '{create}'), (gen_random_uuid(), 'e2', '{create}')"
    )
    await pool.execute(
        "INSERT INTO security_events (domain_id, change_id, internal_id, jti) "
        "SELECT 'P1', id, internal_id, 'jti-' || internal_id FROM home_changes"
    )
    acked = await pool.fetch(query("events_acknowledged"), "P1", ["jti-e1"])
    assert [r["jti"] for r in acked] == ["jti-e1"]
    refused = await pool.fetch(
        query("events_refused"),
        "P1",
        [{"jti": "jti-e2", "err": "invalid_key", "description": "no such key"}],
    )
    assert [r["jti"] for r in refused] == ["jti-e2"]
    rows = await pool.fetch(
        "SELECT internal_id, domain_id, kind, status, details FROM entity_history ORDER BY id"
    )
    assert [(r["internal_id"], r["domain_id"], r["kind"], r["status"]) for r in rows] == [
        ("e1", "P1", "set", "acknowledged"),
        ("e2", "P1", "set", "failed"),
    ]
    assert rows[1]["details"]["answer"] == {"err": "invalid_key", "description": "no such key"}


# --------------------------------------------------------------------------- dry runs


async def test_a_dry_run_merge_shows_the_tables_and_tasks_and_changes_nothing(
    federated: tuple[Broker, Gate], broker_cli: CLI
) -> None:
    broker, _front = federated
    jsmith, johns = await person(broker, "JSmith"), await person(broker, "JohnS")
    await quiesce(broker)
    l1, l2 = await peer_id(broker, "P1", johns["id"]), await peer_id(broker, "P2", johns["id"])
    token, _ = await TokenStore(broker.pool).issue("H", scopes=["admin"])
    before = await snapshot(broker.pool)

    status, out, _ = await broker_cli("merge", jsmith["id"], johns["id"], "--dry-run")
    assert status == 0, out
    assert "dry run of the merge: nothing was changed" in out
    now, after = out.split("The mapping table after the merge:")
    after, tasks = after.split("What each peer will get:")
    assert (johns["id"], "P1", l1, "true", "active") in cells(now)
    assert (jsmith["id"], "P1", l1, "false", "deletion_required") in cells(after)
    assert not any(row[0] == johns["id"] for row in cells(after))
    for domain, alias in (("P1", l1), ("P2", l2)):
        assert (domain, "move_memberships", jsmith["id"]) in {r[:3] for r in cells(tasks)}
        assert (domain, "delete_alias", jsmith["id"], f"external ID {alias}") in cells(tasks)

    status, preview = await admin(
        broker,
        "POST",
        "/admin/merges/dry-run",
        {"survivor": jsmith["id"], "losers": [johns["id"]]},
        token=token,
    )
    assert status == 200 and preview["dryRun"] is True
    assert {(r["domain"], r["externalId"], r["primary"]) for r in preview["after"]} >= {
        ("P1", l1, False),
        ("P2", l2, False),
    }
    assert [t["task"] for t in preview["tasks"]].count("delete_alias") == 2
    for path, body in (
        ("/admin/merges?dry_run=true", {"survivor": jsmith["id"], "losers": [johns["id"]]}),
        ("/admin/merges", {"survivor": jsmith["id"], "losers": [johns["id"]], "dry_run": True}),
    ):
        status, same = await admin(broker, "POST", path, body, token=token)
        assert status == 200 and same == preview
    assert await snapshot(broker.pool) == before

    # Refused as the merge itself would be, and still nothing changes.
    status, _, err = await broker_cli("merge", jsmith["id"], "no-such-entity", "--dry-run")
    assert status == 1 and "never seen entity no-such-entity" in err
    status, error = await admin(
        broker,
        "POST",
        "/admin/merges/dry-run",
        {"survivor": jsmith["id"], "losers": []},
        token=token,
    )
    assert status == 400 and '"losers" is required' in error["detail"]
    assert await snapshot(broker.pool) == before


async def test_a_dry_run_split_shows_the_moved_row_and_changes_nothing(
    federated: tuple[Broker, Gate], broker_cli: CLI, home: Home
) -> None:
    broker, _front = federated
    jsmith = await person(broker, "JSmith")
    await quiesce(broker)
    s2 = await peer_id(broker, "P2", jsmith["id"])
    status, other = home.call("POST", "/Users", new_user(unique("jsmith")))
    assert status == 201
    token, _ = await TokenStore(broker.pool).issue("H", scopes=["admin"])
    before = await snapshot(broker.pool)

    status, out, _ = await broker_cli(
        "split", jsmith["id"], other["id"], "--move", f"P2:{s2}", "--provision", "eager",
        "--dry-run",
    )  # fmt: skip
    assert status == 0, out
    _, after = out.split("The mapping table after the split:")
    after, tasks = after.split("What each peer will get:")
    assert (other["id"], "P2", s2, "true", "active") in cells(after)
    planned = {r[:3] for r in cells(tasks)}
    assert ("P2", "provision", jsmith["id"]) in planned  # the source needs a new account there
    assert ("P1", "provision", other["id"]) in planned

    status, preview = await admin(
        broker,
        "POST",
        "/admin/splits/dry-run",
        {"source": jsmith["id"], "new": [other["id"]], "move": {"P2": [s2]}},
        token=token,
    )
    assert status == 200, preview
    assert {(r["internalId"], r["domain"]) for r in preview["after"]} >= {(other["id"], "P2")}
    # The split-off is not recorded by a dry run, though a split would record it.
    assert await snapshot(broker.pool) == before

    status, _, err = await broker_cli(
        "split", jsmith["id"], other["id"], "--move", "P2", "--dry-run"
    )
    assert status == 1 and "write DOMAIN:EXTERNAL_ID" in err
    status, _, err = await broker_cli(
        "split", jsmith["id"], other["id"], "--move", "P2:nope", "--dry-run"
    )
    assert status == 1 and "P2:nope is not mapped to" in err
    status, error = await admin(
        broker,
        "POST",
        "/admin/splits/dry-run",
        {"source": "gone", "new": [other["id"]]},
        token=token,
    )
    assert status == 404, error
    assert await snapshot(broker.pool) == before
