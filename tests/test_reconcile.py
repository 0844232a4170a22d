"""Reconciliation against real parts: a home and a push peer (tenants of a real scim2-server),
the broker's worker delivering what a run decides, and ``broker reconcile`` run as an operator
runs it (docs/reconciliation.md)."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import pytest

from broker.app import HOME, POOL
from broker.db import query
from broker.errors import BrokerError, ConflictError
from broker.mapping.store import MappingStore
from broker.propagation.peer import PeerClient
from broker.propagation.poller import HomePoller
from broker.reconcile.runner import Reconciler
from broker.reconcile.situations import Options
from tests.propagation_support import (
    FAST,
    admin,
    admin_metrics,
    assert_no_internal_id,
    cli,
    federation,
    gate,
    held,
    home_ids,
    quiesce,
    tenant,
)
from tests.scim_support import CORE_GROUP, Broker, Home, new_user
from tests.waiting import until

IN = "staff"
"""The title of the home users in the peer's scope."""


@pytest.fixture
async def world(
    db_url: str, peer_server: Home, homes_server: Home, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Broker, Home, Home]]:
    """A home of the test's own, an empty push peer P scoped to title "staff", and the broker
    delivering to it; the CLI reaches the same home."""
    home, peer = tenant(homes_server, "home"), tenant(peer_server, "peer")
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
    status, shown = await cli(db_url, "operations", report["id"])
    assert (
        status == 0 and "P: done: 1 deleted, 1 drifted, 1 missing, 3 disputed, 1 unlinked" in shown
    ), shown


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


async def test_a_run_leaves_the_planner_the_true_size_of_its_copy_of_home_and_its_items(
    world: tuple[Broker, Home, Home], db_url: str
) -> None:
    """The run's tables fill from empty during the run; taken for empty (never analyzed), they
    got plans that checked every row against every other: a run quadratic in the peer's size
    (docs/reconciliation.md, "Measured"). Each pass now analyzes what it wrote."""
    broker, home, peer = world
    for n in range(7):
        user(home, f"sized{n}", title=IN)
        user(peer, f"sized{n}")
    status, report, out = await reconcile(db_url, "--dry-run")
    assert status == 0, out
    assert report["counts"]["situations"]["unlinked"] == 7, report["counts"]
    pool = broker.app[POOL]
    planned = {
        r["relname"]: r["reltuples"]
        for r in await pool.fetch(
            "SELECT relname, reltuples FROM pg_class "
            "WHERE relname IN ('reconciliation_home', 'reconciliation_items')"
        )
    }
    items = await pool.fetchval("SELECT count(*) FROM reconciliation_items")
    assert planned == {"reconciliation_home": 7, "reconciliation_items": items}, planned


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


def fill(server: Home, endpoint: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Create ``bodies`` at ``endpoint``, several at a time."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda body: post(server, endpoint, body), bodies))


def listed(server: Home, endpoint: str) -> list[dict[str, Any]]:
    status, body = server.call("GET", f"{endpoint}?count=5000")
    assert status == 200, body
    resources: list[dict[str, Any]] = body.get("Resources", [])
    assert body["totalResults"] == len(resources)
    return resources


async def test_initial_sync_brings_a_thousand_users_and_fifty_groups_into_a_new_peer_once(
    db_url: str, peer_server: Home, homes_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, peer = tenant(homes_server, "home"), tenant(peer_server, "peer")
    users = fill(home, "/Users", [new_user(f"person{n:04d}") for n in range(1000)])
    groups = fill(
        home,
        "/Groups",
        [
            {
                "schemas": [CORE_GROUP],
                "displayName": f"team{g:02d}",
                "members": [{"value": u["id"]} for u in users[g * 20 : g * 20 + 20]],
            }
            for g in range(50)
        ],
    )
    # Accounts the peer holds already: linked, not duplicated.
    existing = {user(peer, f"PERSON{n:04d}")["id"] for n in range(0, 1000, 100)}
    existing.add(post(peer, "/Groups", {"schemas": [CORE_GROUP], "displayName": "team07"})["id"])
    settings = FAST.model_copy(update={"initial_sync": True})
    brokers = federation(db_url, home, {"P": peer.url}, monkeypatch, peer_server.token, settings)
    broker = await anext(brokers)
    try:
        pool = broker.app[POOL]

        async def synced() -> bool:
            state = await pool.fetchval("SELECT initial_sync FROM domains WHERE id = 'P'")
            assert state != "failed"
            return bool(state == "done")

        await until(synced, "the initial sync ran")
        await quiesce(broker, within=300)
        metrics = await admin_metrics(broker)
        assert 'broker_initial_sync_entities{count="arrived",domain="P"} 1050.0' in metrics
    finally:
        await brokers.aclose()

    peer_users, peer_groups = listed(peer, "/Users"), listed(peer, "/Groups")
    assert sorted(u["userName"].lower() for u in peer_users) == sorted(u["userName"] for u in users)
    assert sorted(g["displayName"] for g in peer_groups) == sorted(g["displayName"] for g in groups)
    assert existing <= {r["id"] for r in peer_users + peer_groups}
    user_ids = {u["id"] for u in peer_users}
    for group in peer_groups:
        members = {m["value"] for m in group.get("members", [])}
        assert len(members) == 20 and members <= user_ids, group["displayName"]
    assert_no_internal_id(peer, {u["id"] for u in users} | {g["id"] for g in groups})
    status, shown = await cli(db_url, "domain", "show", "P")
    assert status == 0 and "initial sync: done (1050/1050 in the peer)" in shown, shown


async def test_broker_sync_restarts_a_push_domains_initial_sync_and_refuses_other_domains(
    world: tuple[Broker, Home, Home], db_url: str
) -> None:
    broker, home, peer = world
    made = user(home, "late", title=IN)
    user(home, "elsewhere", title="contractor")
    status, out = await cli(db_url, "sync", "P", "--now")
    assert status == 0, out
    await quiesce(broker)
    assert [u["userName"] for u in held(peer)["Users"]] == ["late"]
    assert_no_internal_id(peer, {made["id"]})
    status, out = await cli(db_url, "sync", "P")
    assert status == 0 and "broker domain show P" in out, out
    assert (
        await broker.app[POOL].fetchval("SELECT initial_sync FROM domains WHERE id = 'P'")
        == "needed"
    )

    before = await snapshot(broker, peer)
    for args in (("sync", "D"), ("reconcile", "D"), ("reconcile", "P", "--only", "bogus")):
        status, out = await cli(db_url, *args)
        assert status == 1 and "broker:" in out, (args, out)
    status, out = await cli(db_url, "domain", "update", "P", "--correlate", "password")
    assert status == 1 and "--correlate" in out, out
    assert await snapshot(broker, peer) == before


async def test_a_sweep_that_finds_too_many_deletions_holds_them_until_a_person_confirms(
    world: tuple[Broker, Home, Home], db_url: str
) -> None:
    broker, home, peer = world
    made = [user(home, f"leaver{n}", title=IN) for n in range(4)]
    status, out = await cli(db_url, "sync", "P", "--now")
    assert status == 0, out
    await quiesce(broker)
    assert len(held(peer)["Users"]) == 4
    poller = HomePoller(broker.app[POOL], broker.app[HOME], interval=1, sweep_interval=0.01)
    await poller.poll_once()  # the first poll sets the watermark
    for u in made[:2]:  # half of them: more than max(1, 5%)
        assert home.call("DELETE", f"/Users/{u['id']}")[0] == 204

    async def swept() -> bool:
        await poller.poll_once()
        return bool(
            await broker.app[POOL].fetchval(
                "SELECT count(*) FROM audit_log WHERE action = 'sweep.held'"
            )
        )

    await until(swept, "the sweep held the deletions")
    await quiesce(broker)
    assert len(held(peer)["Users"]) == 4, "a held sweep deleted accounts"

    status, report, out = await reconcile(
        db_url, "--on-deleted", "deprovision", "--confirm-deletions", "2"
    )
    assert status == 0 and report["counts"]["situations"]["deleted"] == 2, out
    await quiesce(broker)
    assert sorted(u["userName"] for u in held(peer)["Users"]) == ["leaver2", "leaver3"]


async def test_a_run_a_failing_peer_stopped_resumes_from_the_page_it_reached(
    world: tuple[Broker, Home, Home],
) -> None:
    broker, home, peer = world
    pool = broker.app[POOL]
    for n in range(7):
        user(home, f"resume{n}", title=IN)
        user(peer, f"resume{n}")
    async with gate(peer) as front, aiohttp.ClientSession() as session:
        lines: list[str] = []

        def progress(line: str) -> None:
            if not line.startswith("P: users read"):
                return  # home's pages, read first
            lines.append(line)
            if len(lines) == 2:  # after the peer's second page: the peer fails
                front.failures.append((503, {}))

        reconciler = Reconciler(
            pool,
            broker.app[HOME],
            PeerClient(session, front.url, peer.token, domain="P"),
            domain="P",
            scope=f'title eq "{IN}"',
            readable=None,
            page_size=2,
            rate=0,
            progress=progress,
        )
        run = await reconciler.start(Options(dry_run=True), actor="test")
        with pytest.raises(BrokerError, match="HTTP 503"):
            await reconciler.run(run)
        with pytest.raises(ConflictError, match="--fresh"):
            await reconciler.start(Options(), actor="test")  # a real run never resumes a dry one
        front.forwarded.clear()
        resumed = await reconciler.start(Options(dry_run=True), actor="test")
        assert (resumed.id, resumed.phase, resumed.cursor) == (run.id, "peer", 5)
        report = await reconciler.run(resumed)
    assert_no_internal_id(peer, home_ids(home))
    sent = json.dumps(front.forwarded)
    assert not [i for i in home_ids(home) if i in sent], (
        "a request to the peer named an internal ID"
    )
    reads = [path for method, path, _ in front.forwarded if method == "GET" and path == "/Users"]
    assert len(reads) == 2, "the resumed run read again what it had recorded"
    assert report.counts["situations"]["unlinked"] == 7
    assert (
        await pool.fetchval(
            "SELECT count(DISTINCT external_id) FROM reconciliation_items WHERE run_id = $1", run.id
        )
        == 7
    )


async def test_a_runs_actions_come_in_order_from_an_index_not_a_sort(pool: Any) -> None:
    """0023: actionable_items hands over the undone actions users first, each kind in the order
    found, straight from reconciliation_items_actionable: no batch sorts what is left of the
    run (at 100,000 accounts that sort took 46 ms a batch)."""
    run = uuid.uuid4()
    await pool.execute(
        "INSERT INTO domains (id, kind, push, scim_url) VALUES ('P', 'peer', true, 'http://p.invalid/v2');"
    )
    await pool.execute(
        "INSERT INTO operations (id, kind, idempotency_key, request, actor)"
        " VALUES ($1, 'reconcile', 'k', '{}', 'test')",
        run,
    )
    await pool.execute(query("start_reconciliation"), run, "P", False, False, {})
    kinds = ["Group", "User", "User", "Group", "User"] * 40
    actions = ["sync", "link", "report", "create", "sync"] * 40
    await pool.execute(
        query("record_items"),
        run,
        kinds,
        ["missing"] * len(kinds),
        [f"x{n}" for n in range(len(kinds))],
        [None] * len(kinds),
        actions,
        [{}] * len(kinds),
    )
    await pool.execute("UPDATE reconciliation_items SET done = true WHERE external_id = 'x1'")
    await pool.execute("ANALYZE reconciliation_items")
    items = await pool.fetch(query("actionable_items"), run, 500)
    expected = [
        f"x{n}" for n in range(len(kinds)) if kinds[n] == "User" and actions[n] != "report"
    ] + [f"x{n}" for n in range(len(kinds)) if kinds[n] == "Group"]
    expected.remove("x1")
    assert [i["external_id"] for i in items] == expected
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off")
        plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + query("actionable_items"), run, 500)
    text = json.dumps(plan)
    assert "reconciliation_items_actionable" in text
    assert '"Sort"' not in text
