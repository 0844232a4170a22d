"""Reconciliation against real parts: a home and a push peer (tenants of a real scim2-server),
the broker's worker delivering what a run decides, and ``broker reconcile`` run as an operator
runs it (docs/reconciliation.md)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.app import POOL
from broker.mapping.store import MappingStore
from tests.propagation_support import (
    admin,
    assert_no_internal_id,
    cli,
    federation,
    held,
    home_ids,
    quiesce,
    tenant,
)
from tests.scim_support import Broker, Home, new_user
from tests.waiting import until

IN = "staff"
"""The title of the home users in the peer's scope."""


@pytest.fixture
async def world(
    db_url: str, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Broker, Home, Home]]:
    """A home of the test's own, an empty push peer P scoped to title "staff", and the broker
    delivering to it; the CLI reaches the same home."""
    home, peer = tenant(peer_server, "home"), tenant(peer_server, "peer")
    monkeypatch.setenv("BROKER_HOME__SCIM_URL", home.url)
    monkeypatch.setenv("BROKER_HOME__TOKEN", home.token)
    async for broker in federation(
        db_url,
        home,
        {"P": peer.url},
        monkeypatch,
        peer_server.token,
        scope_filter=f'title eq "{IN}"',
    ):
        yield broker, home, peer


def post(server: Home, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    status, made = server.call("POST", endpoint, body)
    assert status == 201, made
    assert isinstance(made, dict)
    return made


def user(server: Home, name: str, **extra: Any) -> dict[str, Any]:
    return post(server, "/Users", new_user(name, **extra))


async def reconcile(db_url: str, *args: str) -> tuple[int, dict[str, Any], str]:
    """``broker reconcile P --json ARGS``: its status, its JSON report, and what it printed."""
    status, out = await cli(db_url, "reconcile", "P", "--json", "--rate", "0", *args)
    line = next((ln for ln in out.splitlines() if ln.startswith("{")), None)
    assert line is not None, out
    return status, json.loads(line), out


def by_situation(report: dict[str, Any]) -> dict[str, set[str]]:
    """Situation -> the peer accounts (or, for entities the peer lacks, the entities) in it."""
    found: dict[str, set[str]] = {}
    for item in report["items"]:
        found.setdefault(item["situation"], set()).add(item["externalId"] or item["internalId"])
    return found


async def snapshot(broker: Broker, peer: Home) -> tuple[Any, ...]:
    pool = broker.app[POOL]
    rows = await pool.fetch("SELECT * FROM id_mappings ORDER BY id")
    outbox = await pool.fetch("SELECT id, kind, state FROM outbox ORDER BY id")
    return [dict(r) for r in rows], [dict(r) for r in outbox], held(peer)


async def test_a_peer_that_exists_already_is_reconciled_situation_by_situation(
    world: tuple[Broker, Home, Home], db_url: str
) -> None:
    broker, home, peer = world
    pool = broker.app[POOL]
    store = MappingStore(pool)
    h = {
        name: user(
            home,
            name,
            title=IN,
            displayName=name.title(),
            emails=[{"value": f"{name}@home.example"}],
        )
        for name in ("alice", "bob", "erin", "gina", "pat", "quinn", "rita")
    }
    h["oscar"] = user(home, "oscar", title="contractor")
    p = {
        "alice": user(peer, "ALICE", displayName="Alice"),  # matches alice (case aside)
        "bob": user(peer, "bob", displayName="Old Bob"),  # mapped, drifted
        "erin": user(peer, "erin", displayName="Erin"),  # mapped, then deleted in home
        "orphan1": user(peer, "orphan1"),
        "orphan2": user(peer, "orphan2"),
        "pat": user(peer, "pat"),  # pat, and patricia by pat's e-mail: disputed
        "patricia": user(peer, "patricia", emails=[{"value": "pat@home.example"}]),
        "quinn": user(peer, "quinn", emails=[{"value": "rita@home.example"}]),  # two entities
        "oscar": user(peer, "oscar"),  # out of the domain's scope
    }
    await store.register_entities({h["bob"]["id"]: "User", h["erin"]["id"]: "User"})
    await store.add_mapping(h["bob"]["id"], "P", p["bob"]["id"])
    await store.add_mapping(h["erin"]["id"], "P", p["erin"]["id"])
    assert home.call("DELETE", f"/Users/{h['erin']['id']}")[0] == 204
    status, out = await cli(db_url, "domain", "update", "P", "--correlate", "userName,emails.value")
    assert status == 0 and "correlate:   userName, emails.value" in out, out

    before = await snapshot(broker, peer)
    status, plan, out = await reconcile(db_url, "--dry-run")
    assert status == 0, out
    expected = {
        "unlinked": {p["alice"]["id"]},
        "drifted": {p["bob"]["id"]},
        "deleted": {p["erin"]["id"]},
        "unmatched": {p["orphan1"]["id"], p["orphan2"]["id"]},
        "disputed": {p["pat"]["id"], p["patricia"]["id"], p["quinn"]["id"]},
        "out_of_scope": {p["oscar"]["id"]},
        "missing": {h["gina"]["id"]},
    }
    assert by_situation(plan) == expected, plan
    assert plan["counts"]["situations"]["linked"] == 0
    assert await snapshot(broker, peer) == before, "a dry run changed something"

    status, report, out = await reconcile(
        db_url, "--on-deleted", "deprovision", "--confirm-deletions", "1"
    )
    assert status == 0, out
    assert report["counts"]["actions"] == {"link": 1, "sync": 1, "create": 1, "deprovision": 1}
    await quiesce(broker)

    accounts = held(peer)["Users"]
    names = Counter(a["userName"].lower() for a in accounts)
    assert max(names.values()) == 1, names  # no entity has two accounts in the peer
    assert "erin" not in names and "gina" in names
    assert {"orphan1", "orphan2", "pat", "patricia", "quinn", "oscar"} <= set(names)
    linked_alice = await pool.fetchval(
        "SELECT external_id FROM id_mappings WHERE domain_id = 'P' AND internal_id = $1 AND is_primary",
        h["alice"]["id"],
    )
    assert linked_alice == p["alice"]["id"]  # linked to the peer's own account, not duplicated
    bob = next(a for a in accounts if a["id"] == p["bob"]["id"])
    assert bob["displayName"] == "Bob"
    assert_no_internal_id(peer, home_ids(home))

    status, again, out = await reconcile(db_url, "--dry-run")
    assert status == 0, out
    second = by_situation(again)
    assert second.pop("linked") == {p["alice"]["id"], p["bob"]["id"]} | {
        a["id"] for a in held(peer)["Users"] if a["userName"] == "gina"
    }
    assert second == {k: expected[k] for k in ("unmatched", "disputed", "out_of_scope")}

    status, listing = await cli(db_url, "operations")
    assert status == 0 and listing.count("reconcile") == 3, listing


async def test_the_deletion_threshold_stops_a_run_that_would_delete_a_tenth_of_a_peer(
    world: tuple[Broker, Home, Home], db_url: str
) -> None:
    broker, home, peer = world
    for n in range(18):
        user(home, f"member{n}", title=IN)
        user(peer, f"member{n}")
    orphans = {user(peer, f"stray{n}")["id"] for n in range(2)}
    before = await snapshot(broker, peer)

    status, report, out = await reconcile(db_url, "--on-unmatched", "deprovision")
    assert status == 1
    assert report["state"] == "stopped"
    assert "--confirm-deletions 2" in out and "10%" in out, out
    await quiesce(broker)
    assert await snapshot(broker, peer) == before, "a stopped run changed something"

    status, report, out = await reconcile(
        db_url, "--on-unmatched", "deprovision", "--confirm-deletions", "2"
    )
    assert status == 0, out
    await quiesce(broker)
    left = {a["id"] for a in held(peer)["Users"]}
    assert not left & orphans and len(left) == 18


async def test_the_admin_api_starts_a_dry_run_and_reads_its_report(
    world: tuple[Broker, Home, Home],
) -> None:
    broker, home, peer = world
    user(home, "zoe", title=IN)
    account = user(peer, "Zoe")
    status, refused = await admin(
        broker, "POST", "/admin/reconciliations", {"domain": "P", "actions": {"unmatched": "nuke"}}
    )
    assert status == 400 and refused["scimType"] == "invalidValue", refused
    status, started = await admin(
        broker, "POST", "/admin/reconciliations", {"domain": "P", "dryRun": True}
    )
    assert status == 202, started

    async def finished() -> dict[str, Any] | None:
        code, report = await admin(broker, "GET", f"/admin/reconciliations/{started['id']}")
        assert code == 200, report
        return report if report["state"] == "done" else None

    report = await until(finished, "the run finished")
    assert [(i["situation"], i["externalId"]) for i in report["items"]] == [
        ("unlinked", account["id"])
    ]
    assert await broker.app[POOL].fetchval("SELECT count(*) FROM id_mappings") == 0
