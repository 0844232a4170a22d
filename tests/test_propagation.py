"""Propagation to push peers, end to end: a real home, real peers (tenants of a real scim2-server),
the broker's own worker delivering through its durable outbox."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from broker.app import DELIVERER, HOME, POOL
from broker.db import query
from broker.domains import DomainStore
from broker.propagation.journal import record
from broker.propagation.policy import Backoff
from broker.propagation.poller import HomePoller
from broker.propagation.worker import Deliverer, WorkerSettings
from broker.propagation.writes import HomeWrite
from broker.secrets import SecretBox
from broker.tokens import TokenStore, hash_token
from tests.propagation_support import (
    FAST,
    admin,
    admin_call,
    admin_metrics,
    assert_no_internal_id,
    cli,
    federation,
    gate,
    held,
    home_tool,
    patch,
    peer_id,
    peer_user,
    quiesce,
    tenant,
)
from tests.scim_support import CORE_GROUP, Broker, Home, new_user, unique
from tests.waiting import until


@pytest.fixture
async def two_peers(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Broker, Home, Home]]:
    p1, p2 = tenant(peer_server, "p1"), tenant(peer_server, "p2")
    async for broker in federation(
        db_url, home, {"P1": p1.url, "P2": p2.url}, monkeypatch, peer_server.token
    ):
        yield broker, p1, p2


async def test_home_tools_writes_reach_both_peers_with_their_own_ids(
    two_peers: tuple[Broker, Home, Home],
) -> None:
    broker, p1, p2 = two_peers
    _, alice = await home_tool(broker, "POST", "/Users", new_user(displayName="Alice"))
    _, bob = await home_tool(broker, "POST", "/Users", new_user(displayName="Bob"))
    status, group = await home_tool(
        broker,
        "POST",
        "/Groups",
        {
            "schemas": [CORE_GROUP],
            "displayName": unique("g"),
            "members": [{"value": alice["id"]}, {"value": bob["id"]}],
        },
    )
    assert status == 201, group
    await quiesce(broker)
    internal = {alice["id"], bob["id"], group["id"]}
    for name, peer in (("P1", p1), ("P2", p2)):
        a, b, g = [await peer_id(broker, name, i) for i in (alice["id"], bob["id"], group["id"])]
        assert a and b and g and not {a, b, g} & internal
        held_alice = peer_user(peer, a)
        assert held_alice["userName"] == alice["userName"]
        handle = await broker.app[POOL].fetchval(
            "SELECT correlation_handle FROM id_mappings WHERE domain_id = $1 AND external_id = $2",
            name,
            a,
        )
        assert held_alice["externalId"] == handle
        _, held_group = peer.call("GET", f"/Groups/{g}")
        assert sorted(m["value"] for m in held_group["members"]) == sorted([a, b])
        assert_no_internal_id(peer, internal)
    p1_ids = {await peer_id(broker, "P1", i) for i in internal}
    p2_ids = {await peer_id(broker, "P2", i) for i in internal}
    assert not p1_ids & p2_ids, "each peer has IDs of its own"

    # An update and a member removed: the peers follow, with PATCH.
    await home_tool(
        broker,
        "PATCH",
        f"/Users/{alice['id']}",
        patch({"op": "replace", "path": "displayName", "value": "Alice B."}),
    )
    await home_tool(
        broker,
        "PATCH",
        f"/Groups/{group['id']}",
        patch({"op": "remove", "path": f'members[value eq "{bob["id"]}"]'}),
    )
    await quiesce(broker)
    for name, peer in (("P1", p1), ("P2", p2)):
        a = await peer_id(broker, name, alice["id"])
        g = await peer_id(broker, name, group["id"])
        assert a is not None
        assert peer_user(peer, a)["displayName"] == "Alice B."
        _, held_group = peer.call("GET", f"/Groups/{g}")
        assert [m["value"] for m in held_group["members"]] == [a]

    # A delete: gone from both peers, its rows retired.
    status, _ = await home_tool(broker, "DELETE", f"/Users/{bob['id']}")
    assert status == 204
    await quiesce(broker)
    for name, peer in (("P1", p1), ("P2", p2)):
        assert await peer_id(broker, name, bob["id"]) is None
        assert not [u for u in held(peer)["Users"] if u["userName"] == bob["userName"]]
        assert_no_internal_id(peer, internal)


async def test_an_update_is_the_smallest_patch(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = tenant(peer_server, "p1")
    async with gate(peer) as front:
        async for broker in federation(
            db_url, home, {"P1": front.url}, monkeypatch, peer_server.token
        ):
            users = [(await home_tool(broker, "POST", "/Users", new_user()))[1] for _ in range(3)]
            _, group = await home_tool(
                broker,
                "POST",
                "/Groups",
                {
                    "schemas": [CORE_GROUP],
                    "displayName": unique("g"),
                    "members": [{"value": u["id"]} for u in users[:2]],
                },
            )
            await quiesce(broker)
            front.forwarded.clear()
            await home_tool(
                broker,
                "PATCH",
                f"/Groups/{group['id']}",
                patch(
                    {"op": "remove", "path": f'members[value eq "{users[0]["id"]}"]'},
                    {"op": "add", "path": "members", "value": [{"value": users[2]["id"]}]},
                ),
            )
            await quiesce(broker)
            patches = [body for method, _path, body in front.forwarded if method == "PATCH"]
            first, third = [await peer_id(broker, "P1", u["id"]) for u in (users[0], users[2])]
            assert patches == [
                patch(
                    {"op": "remove", "path": f'members[value eq "{first}"]'},
                    {"op": "add", "path": "members", "value": [{"value": third}]},
                )
            ]


async def test_changes_made_in_home_directly_are_found_by_the_poller(
    two_peers: tuple[Broker, Home, Home],
) -> None:
    broker, p1, p2 = two_peers
    poller = HomePoller(broker.app[POOL], broker.app[HOME], interval=1, sweep_interval=0.01)
    await poller.poll_once()  # the first poll only sets the watermark
    status, carol = broker.home.call("POST", "/Users", new_user(displayName="Carol"))
    assert status == 201
    assert await poller.poll_once() == 1
    assert await poller.poll_once() == 0, "a change is found once"
    await quiesce(broker)
    for name, peer in (("P1", p1), ("P2", p2)):
        found = await peer_id(broker, name, carol["id"])
        assert found is not None and peer_user(peer, found)["displayName"] == "Carol"

    broker.home.call(
        "PATCH",
        f"/Users/{carol['id']}",
        patch({"op": "replace", "path": "displayName", "value": "Carol C."}),
    )
    await poller.poll_once()
    await quiesce(broker)
    found = await peer_id(broker, "P1", carol["id"])
    assert found is not None and peer_user(p1, found)["displayName"] == "Carol C."

    broker.home.call("DELETE", f"/Users/{carol['id']}")
    await until(  # the sweep is due again
        lambda: broker.app[POOL].fetchval(
            "SELECT bool_and(coalesce(swept_at < now() - make_interval(secs => $1), true)) "
            "FROM home_watermarks",
            poller.sweep_interval,
        ),
        "a sweep due",
    )
    assert await poller.poll_once() == 1, "the sweep finds the deletion"
    await quiesce(broker)
    assert await peer_id(broker, "P1", carol["id"]) is None
    assert p1.call("GET", f"/Users/{found}")[0] == 404
    assert_no_internal_id(p1, {carol["id"]})
    assert_no_internal_id(p2, {carol["id"]})


async def test_a_change_from_a_peer_is_not_sent_back_to_it(
    two_peers: tuple[Broker, Home, Home],
) -> None:
    broker, _p1, p2 = two_peers
    status, created, _ = await broker.call("D", "POST", "/Users", new_user(displayName="Dan"))
    assert status == 201
    await quiesce(broker)
    rows = await broker.app[POOL].fetch("SELECT internal_id FROM entities")
    (internal,) = [r["internal_id"] for r in rows]
    p1_id, p2_id = await peer_id(broker, "P1", internal), await peer_id(broker, "P2", internal)
    assert p1_id and p2_id
    before = await broker.app[POOL].fetchval("SELECT max(id) FROM outbox")
    status, _, _ = await broker.call(
        "P1",
        "PATCH",
        f"/Users/{p1_id}",
        patch({"op": "replace", "path": "displayName", "value": "Dan from P1"}),
    )
    assert status in (200, 204)
    new_rows = await broker.app[POOL].fetch("SELECT domain_id FROM outbox WHERE id > $1", before)
    assert [r["domain_id"] for r in new_rows] == ["P2"]
    await quiesce(broker)
    assert peer_user(p2, p2_id)["displayName"] == "Dan from P1"
    assert created["id"] not in (p1_id, p2_id)


async def test_a_peer_that_was_down_gets_every_change_once_in_order(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = tenant(peer_server, "p1")
    async with gate(peer) as front:
        async for broker in federation(
            db_url, home, {"P1": front.url}, monkeypatch, peer_server.token
        ):
            await front.close()  # the peer is down
            users = [(await home_tool(broker, "POST", "/Users", new_user()))[1] for _ in range(5)]
            for n in range(3):
                await home_tool(
                    broker,
                    "PATCH",
                    f"/Users/{users[0]['id']}",
                    patch({"op": "replace", "path": "title", "value": f"v{n}"}),
                )

            async def failing(broker: Broker = broker) -> dict[str, Any] | None:
                status, queue = await admin(broker, "GET", "/admin/domains/P1/queue")
                assert status == 200
                return queue if queue["failing_since"] is not None else None

            queue = await until(failing, "P1 seen failing")
            assert queue["depth"] >= 5 and queue["failing_since"] is not None
            await front.open()  # back
            await quiesce(broker)
            held_users = held(peer)["Users"]
            names = sorted(u["userName"] for u in held_users)
            assert names == sorted(u["userName"] for u in users), "each user exactly once"
            first = await peer_id(broker, "P1", users[0]["id"])
            assert first is not None and peer_user(peer, first)["title"] == "v2"
            # Each create sent once: alone, or as an operation of a SCIM Bulk request.
            creates = [p for m, p, _ in front.forwarded if (m, p) == ("POST", "/Users")]
            creates += [
                op["path"]
                for m, p, body in front.forwarded
                if (m, p) == ("POST", "/Bulk")
                for op in body["Operations"]
                if op["method"] == "POST"
            ]
            assert creates == ["/Users"] * 5, json.dumps(front.forwarded)
            _, queue = await admin(broker, "GET", "/admin/domains/P1/queue")
            assert queue["depth"] == 0 and queue["failing_since"] is None


async def test_retry_after_and_a_server_error_are_retried(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = tenant(peer_server, "p1")
    async with gate(peer) as front:
        async for broker in federation(
            db_url, home, {"P1": front.url}, monkeypatch, peer_server.token
        ):
            front.failures = [(429, {"Retry-After": "1"}), (500, {})]
            loop = asyncio.get_running_loop()
            started = loop.time()
            _, user = await home_tool(broker, "POST", "/Users", new_user())
            await quiesce(broker)
            assert loop.time() - started >= 1.0, "Retry-After was honoured"
            assert len(held(peer)["Users"]) == 1
            row = await broker.app[POOL].fetchrow("SELECT state, attempts FROM outbox")
            assert (row["state"], row["attempts"]) == ("done", 3)
            assert await peer_id(broker, "P1", user["id"]) is not None


async def test_a_lost_answer_to_a_create_does_not_duplicate(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = tenant(peer_server, "p1")
    async with gate(peer) as front:
        async for broker in federation(
            db_url, home, {"P1": front.url}, monkeypatch, peer_server.token
        ):
            front.lose_answers = 2  # the POST (done, but unanswered), then the first lookup
            _, user = await home_tool(broker, "POST", "/Users", new_user())
            await quiesce(broker)
            assert [u["userName"] for u in held(peer)["Users"]] == [user["userName"]]
            assert await peer_id(broker, "P1", user["id"]) == held(peer)["Users"][0]["id"]


async def test_a_refused_delivery_is_dead_lettered_and_can_be_retried(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = tenant(peer_server, "p1")
    async with gate(peer) as front:
        async for broker in federation(
            db_url, home, {"P1": front.url}, monkeypatch, peer_server.token
        ):
            front.failures = [(403, {})]
            _, user = await home_tool(broker, "POST", "/Users", new_user())
            await quiesce(broker)
            assert held(peer)["Users"] == []
            status, listing = await admin(broker, "GET", "/admin/deliveries?state=dead")
            assert status == 200
            (dead,) = listing["deliveries"]
            assert dead["last_error"]["status"] == 403
            assert "permissions" in dead["last_error"]["reason"]
            assert user["id"] == dead["entity"]
            status, retried = await admin(broker, "POST", f"/admin/deliveries/{dead['id']}/retry")
            assert (status, retried["state"]) == (200, "pending")
            await quiesce(broker)
            assert len(held(peer)["Users"]) == 1
            status, again = await admin(broker, "POST", f"/admin/deliveries/{dead['id']}/retry")
            assert status == 409 and "only dead letters" in again["detail"]

            # The same through the command line.
            front.failures = [(400, {})]
            await home_tool(broker, "POST", "/Users", new_user())
            await quiesce(broker)
            code, listed = await cli(db_url, "deliveries", "list", "--domain", "P1")
            assert code == 0 and "HTTP 400" in listed and "schema" in listed
            (row,) = await broker.app[POOL].fetch("SELECT id FROM outbox WHERE state = 'dead'")
            code, _ = await cli(db_url, "deliveries", "discard", str(row["id"]))
            assert code == 0
            code, listed = await cli(db_url, "deliveries", "list")
            assert code == 0 and "HTTP 400" not in listed
            code, _ = await cli(db_url, "deliveries", "retry", str(row["id"]))
            assert code == 1, "a discarded delivery is no dead letter to retry"
            assert len(held(peer)["Users"]) == 1


async def test_a_peer_failing_too_long_is_quarantined_and_leaves_by_itself(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = tenant(peer_server, "p1")
    settings = FAST.model_copy(update={"quarantine_after": 0.3})
    async with gate(peer) as front:
        async for broker in federation(
            db_url, home, {"P1": front.url}, monkeypatch, peer_server.token, settings
        ):
            await front.close()
            for _ in range(3):
                await home_tool(broker, "POST", "/Users", new_user())

            async def quarantined(broker: Broker = broker) -> dict[str, Any] | None:
                _, queue = await admin(broker, "GET", "/admin/domains/P1/queue")
                return queue if queue["quarantined"] else None

            queue = await until(quarantined, "P1 quarantined")
            assert queue["quarantined"]
            metrics = await admin_metrics(broker)
            assert 'broker_peer_quarantined{domain="P1"} 1.0' in metrics
            await front.open()
            await quiesce(broker)
            _, queue = await admin(broker, "GET", "/admin/domains/P1/queue")
            assert not queue["quarantined"] and queue["depth"] == 0
            assert len(held(peer)["Users"]) == 3


async def test_workers_sharing_the_queue_apply_each_change_once(
    two_peers: tuple[Broker, Home, Home],
) -> None:
    broker, p1, p2 = two_peers
    users = [(await home_tool(broker, "POST", "/Users", new_user()))[1] for _ in range(12)]
    app_worker = broker.app[DELIVERER]
    others = [
        Deliverer(
            broker.app[POOL],
            broker.app[HOME],
            app_worker.session,
            id_pattern="[0-9a-f]{32}",
            settings=WorkerSettings(concurrency=3),
        )
        for _ in range(2)
    ]
    await asyncio.gather(*(w.drain() for w in others))
    await quiesce(broker)
    for peer in (p1, p2):
        names = sorted(u["userName"] for u in held(peer)["Users"])
        assert names == sorted(u["userName"] for u in users)


async def test_a_crashed_workers_claims_return_after_the_lease(
    two_peers: tuple[Broker, Home, Home],
) -> None:
    broker, p1, _p2 = two_peers
    pool = broker.app[POOL]
    status, other = broker.home.call("POST", "/Users", new_user())
    assert status == 201
    # A worker claimed the sync and died: the row stays in flight until its lease runs out.
    async with pool.acquire() as conn, conn.transaction():
        await record(conn, HomeWrite(written={other["id"]: "User"}))
        await conn.execute(
            "UPDATE outbox SET state = 'in_flight', claimed_by = 'dead-worker', "
            "lease_until = now() + interval '1 hour' WHERE internal_id = $1",
            other["id"],
        )
    # A later delivery toward P1 done proves the worker claimed since (oldest ready first).
    status, probe = broker.home.call("POST", "/Users", new_user())
    assert status == 201
    async with pool.acquire() as conn, conn.transaction():
        await record(conn, HomeWrite(written={probe["id"]: "User"}))
    await until(lambda: peer_id(broker, "P1", probe["id"]), "the probe delivered to P1")
    assert await peer_id(broker, "P1", other["id"]) is None, "claimed by the dead worker"
    # The lease runs out (an hour, in a moment).
    await pool.execute(
        "UPDATE outbox SET lease_until = now() - interval '1 second' "
        "WHERE claimed_by = 'dead-worker' AND internal_id = $1",
        other["id"],
    )
    await quiesce(broker, within=15)
    found = await peer_id(broker, "P1", other["id"])
    assert found is not None and peer_user(p1, found)["userName"] == other["userName"]


async def test_a_suspending_peer_gets_active_false_first_and_the_delete_later(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = tenant(peer_server, "p1")
    async for broker in federation(
        db_url,
        home,
        {"P1": peer.url},
        monkeypatch,
        peer_server.token,
        deprovision="suspend",
        suspend_for=timedelta(seconds=1.5),
    ):
        _, user = await home_tool(broker, "POST", "/Users", new_user(active=True))
        await quiesce(broker)
        held_id = await peer_id(broker, "P1", user["id"])
        assert held_id is not None and peer_user(peer, held_id)["active"] is True
        status, _ = await home_tool(broker, "DELETE", f"/Users/{user['id']}")
        assert status == 204
        await until(
            lambda held_id=held_id: peer_user(peer, held_id).get("active") is False, "suspended"
        )
        assert peer_user(peer, held_id)["active"] is False, "suspended first"
        assert await peer_id(broker, "P1", user["id"]) == held_id, "still mapped while suspended"
        await quiesce(broker)
        assert peer.call("GET", f"/Users/{held_id}")[0] == 404, "deleted after --suspend-for"
        assert await peer_id(broker, "P1", user["id"]) is None


async def test_bulk_writes_of_home_tools_reach_the_peers(
    two_peers: tuple[Broker, Home, Home],
) -> None:
    broker, p1, p2 = two_peers
    first, second = new_user(), new_user()
    status, answer = await home_tool(
        broker,
        "POST",
        "/Bulk",
        {
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],
            "Operations": [
                {"method": "POST", "path": "/Users", "bulkId": "a", "data": first},
                {"method": "POST", "path": "/Users", "bulkId": "b", "data": second},
            ],
        },
    )
    assert status == 200, answer
    await quiesce(broker)
    for peer in (p1, p2):
        names = sorted(u["userName"] for u in held(peer)["Users"])
        assert names == sorted([first["userName"], second["userName"]])
    gone = answer["Operations"][0]["location"].rsplit("/", 1)[1]
    status, _ = await home_tool(
        broker,
        "POST",
        "/Bulk",
        {
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],
            "Operations": [{"method": "DELETE", "path": f"/Users/{gone}"}],
        },
    )
    assert status == 200
    await quiesce(broker)
    for peer in (p1, p2):
        assert [u["userName"] for u in held(peer)["Users"]] == [second["userName"]]
        assert_no_internal_id(peer, {gone})


async def test_the_admin_listener_refuses_bad_requests_with_scim_errors_and_changes_nothing(
    two_peers: tuple[Broker, Home, Home],
) -> None:
    broker, _p1, _p2 = two_peers
    pool = broker.app[POOL]
    admin_only, _ = await TokenStore(pool).issue("H", scopes=["admin"])
    peer_admin = "bkr_peer-admin-from-before"
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE domain_tokens DISABLE TRIGGER domain_tokens_admin_is_home")
        await conn.execute(
            "INSERT INTO domain_tokens (domain_id, token_hash, prefix, scopes) "
            "VALUES ('P1', $1, 'bkr_pe', ARRAY['scim:read', 'scim:write', 'admin'])",
            hash_token(peer_admin),
        )
        await conn.execute("ALTER TABLE domain_tokens ENABLE TRIGGER domain_tokens_admin_is_home")
    cases = [
        (await admin(broker, "GET", "/admin/deliveries", token=""), 401, None),
        (await admin(broker, "GET", "/admin/deliveries", token=broker.tokens["D"]), 403, None),
        # A peer's token that holds the admin scope from before the rule: refused all the same.
        (await admin(broker, "GET", "/admin/deliveries", token=peer_admin), 403, None),
        (await admin(broker, "GET", "/admin/deliveries?state=lost"), 400, "invalidValue"),
        (await admin(broker, "GET", "/admin/deliveries?limit=many"), 400, "invalidValue"),
        (await admin(broker, "GET", "/admin/domains/nowhere/queue"), 404, None),
        (await admin(broker, "POST", "/admin/deliveries/12345/retry"), 404, None),
        (await admin(broker, "POST", "/admin/deliveries/first/discard"), 404, None),
    ]
    for (status, body), expected, scim_type in cases:
        assert status == expected, body
        assert body["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
        assert body["status"] == str(expected) and body["detail"]
        assert body.get("scimType") == scim_type

    # Home's endpoint is for the home domain's tools with a write scope, nobody else.
    user = new_user()
    for token in (broker.tokens["D"], broker.tokens["P1"], admin_only):
        status, body = await home_tool(broker, "POST", "/Users", user, token=token)
        assert status == 403, body
        assert body["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    assert (
        broker.home.call("GET", f'/Users?filter=userName eq "{user["userName"]}"')[1][
            "totalResults"
        ]
        == 0
    ), "nothing reached home"
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    assert await pool.fetchval("SELECT count(*) FROM entities") == 0


async def test_a_document_that_would_carry_an_internal_id_is_withheld_from_the_peer(
    two_peers: tuple[Broker, Home, Home],
) -> None:
    broker, p1, p2 = two_peers
    _, alice = await home_tool(broker, "POST", "/Users", new_user())
    # Home's data names another entity's internal ID in free text: the rewriter cannot know it
    # is one, the leak guard sees its shape.
    _, bob = await home_tool(broker, "POST", "/Users", new_user(title=f"reports to {alice['id']}"))
    await quiesce(broker)
    for name, peer in (("P1", p1), ("P2", p2)):
        assert [u["userName"] for u in held(peer)["Users"]] == [alice["userName"]]
        assert await peer_id(broker, name, bob["id"]) is None
        assert_no_internal_id(peer, {alice["id"], bob["id"]})
    dead = await broker.app[POOL].fetch(
        "SELECT domain_id, last_error FROM outbox WHERE state = 'dead' ORDER BY domain_id"
    )
    assert [r["domain_id"] for r in dead] == ["P1", "P2"]
    assert all("withheld" in r["last_error"]["reason"] for r in dead)
    assert all(alice["id"] not in json.dumps(r["last_error"]) for r in dead)


async def test_hex_a_domain_wrote_into_a_text_attribute_does_not_stop_the_peers_copy(
    two_peers: tuple[Broker, Home, Home],
) -> None:
    """Class 6 of issue 14: the shape rule withheld every delivery of a user whose title a
    domain had set to 32 hex digits (a dead letter in every push peer); only real internal IDs
    are withheld now."""
    broker, p1, p2 = two_peers
    written = secrets.token_hex(16)
    status, created, _ = await broker.call("D", "POST", "/Users", new_user(title="new"))
    assert status == 201, created
    await quiesce(broker)
    for title in (f"emp-{written.upper()}", f"badge {written}"):
        status, _, _ = await broker.call(
            "D",
            "PATCH",
            f"/Users/{created['id']}",
            patch({"op": "replace", "path": "title", "value": title}),
        )
        assert status in (200, 204)
        await quiesce(broker)
        for peer in (p1, p2):
            assert [u.get("title") for u in held(peer)["Users"]] == [title]
    assert await broker.app[POOL].fetchval("SELECT count(*) FROM outbox WHERE state = 'dead'") == 0


async def test_a_password_reaches_the_peer_from_the_write_sealed_and_erased_once_delivered(
    db_url: str,
    home: Home,
    peer_server: Home,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Home never returns a password: it is delivered from the write itself (home's tools, a
    domain's PATCH through the proxy), waits in the outbox sealed, and is erased once delivered."""
    monkeypatch.setenv("TEST_OUTBOX_KEY", secrets.token_urlsafe(32))
    settings = FAST.model_copy(update={"secret_key_env": "TEST_OUTBOX_KEY"})
    first, second = f"first-{secrets.token_hex(8)}", f"second-{secrets.token_hex(8)}"
    peer = tenant(peer_server, "p1")
    async with gate(peer) as front:
        async for broker in federation(
            db_url, home, {"P1": front.url}, monkeypatch, peer_server.token, settings
        ):
            await front.close()  # the peer is down: the password waits in the outbox
            status, user = await home_tool(
                broker, "POST", "/Users", new_user(displayName="Pat", password=first)
            )
            assert status == 201, user
            assert "password" not in user, "home does not return it: only the write has it"
            await until(  # a first attempt failed: the password waits
                lambda broker=broker: broker.pool.fetchval(
                    "SELECT bool_and(last_error IS NOT NULL AND state = 'pending') FROM outbox"
                ),
                "a failed first attempt",
            )
            sealed = await broker.pool.fetch("SELECT sealed_values FROM outbox")
            assert [r["sealed_values"] is not None for r in sealed] == [True]
            assert first.encode() not in sealed[0]["sealed_values"], "sealed, not in clear"
            await front.open()
            await quiesce(broker)
            posts = [body for method, _, body in front.forwarded if method == "POST"]
            assert [p.get("password") for p in posts] == [first]

            # A domain resets the password through the proxy: the peer gets it in a PATCH.
            _, found, _ = await broker.call(
                "D", "GET", f'/Users?filter=userName eq "{user["userName"]}"'
            )
            d_id = found["Resources"][0]["id"]
            status, _, _ = await broker.call(
                "D",
                "PATCH",
                f"/Users/{d_id}",
                patch({"op": "replace", "path": "password", "value": second}),
            )
            assert status in (200, 204)
            await quiesce(broker)
            patches = [body for method, _, body in front.forwarded if method == "PATCH"]
            assert {"op": "replace", "path": "password", "value": second} in patches[-1][
                "Operations"
            ]

            stored = await broker.pool.fetch(
                "SELECT sealed_values, last_error::text FROM outbox ORDER BY id"
            )
            assert stored and all(r["sealed_values"] is None for r in stored), "erased"
            kept = await broker.pool.fetchval(
                "SELECT string_agg(document::text, '') FROM peer_copies"
            )
            for secret in (first, second):
                assert secret not in kept, "what the peer last received is kept without it"
                assert secret not in caplog.text, "never logged"
                assert all(secret not in (r["last_error"] or "") for r in stored)
            assert_no_internal_id(peer, {user["id"]})


async def test_sealed_values_of_a_folded_sync_move_to_the_one_that_stays(
    pool: asyncpg.Pool,
) -> None:
    """A newer pending sync folded into a retried one hands it its newer password; the folded
    row keeps none."""
    await DomainStore(pool).add("P1", scim_url="http://peer.invalid/v2", push=True)
    box = SecretBox(bytes(32))

    def setting(password: str | None) -> HomeWrite:
        values = {"e1": {"password": password}} if password else {}
        return HomeWrite(written={"e1": "User"}, write_only=values)

    async with pool.acquire() as conn, conn.transaction():
        await record(conn, setting("old"), box=lambda: box)
    claimed = await pool.fetch(query("claim_deliveries"), "P1", "w1", 1, 60.0)
    assert [box.open(r["sealed_values"]) for r in claimed] == [{"password": "old"}]
    async with pool.acquire() as conn, conn.transaction():
        await record(conn, setting("new"), box=lambda: box)
        await record(conn, setting(None))  # a later change without a password
    await pool.execute(
        query("delivery_later"), claimed[0]["id"], "w1", datetime.now(UTC), True, None
    )
    rows = await pool.fetch("SELECT state, sealed_values FROM outbox ORDER BY id")
    assert [(r["state"], r["sealed_values"] and box.open(r["sealed_values"])) for r in rows] == [
        ("pending", {"password": "new"}),
        ("cancelled", None),
    ]


async def test_a_create_refused_as_a_duplicate_links_to_the_peers_resource_by_policy(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """409 uniqueness on create: with ``--on-conflict link`` the resource the peer already has
    (same userName) becomes the entity's primary there and is brought to home's state; with the
    default, the delivery is a dead letter saying what to do."""
    linking, refusing = tenant(peer_server, "p1"), tenant(peer_server, "p2")
    name = unique("dup")
    for peer in (linking, refusing):
        status, _ = peer.call(
            "POST", "/Users", new_user(name, displayName="made in the peer", externalId="theirs")
        )
        assert status == 201
    async for broker in federation(
        db_url, home, {"P1": linking.url}, monkeypatch, peer_server.token, on_conflict="link"
    ):
        await DomainStore(broker.pool).add(
            "P2", scim_url=refusing.url, credential_ref="env:P1_TOKEN", push=True
        )
        _, user = await home_tool(broker, "POST", "/Users", new_user(name, displayName="Home's"))
        await quiesce(broker)
        linked = held(linking)["Users"]
        assert len(linked) == 1, "linked, not duplicated"
        assert await peer_id(broker, "P1", user["id"]) == linked[0]["id"]
        assert linked[0]["displayName"] == "Home's"
        assert linked[0]["externalId"] != "theirs", "it now carries the correlation handle"
        dead = await broker.pool.fetchrow(
            "SELECT state, last_error FROM outbox WHERE domain_id = 'P2'"
        )
        assert dead["state"] == "dead"
        assert "409" in json.dumps(dead["last_error"])
        assert [u["displayName"] for u in held(refusing)["Users"]] == ["made in the peer"]
        for peer in (linking, refusing):
            assert_no_internal_id(peer, {user["id"]})


async def test_concurrency_bounds_the_requests_at_the_peer_while_as_many_deliveries_get_ready(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = tenant(peer_server, "p1")
    # One request per write (no Bulk): the bound is on requests; test_propagation_bulk.py has
    # the writes that wait for a slot travel together.
    two = FAST.model_copy(update={"concurrency": 2, "bulk_operations": 0})
    async with gate(peer) as front:
        async for broker in federation(
            db_url, home, {"P1": front.url}, monkeypatch, peer_server.token, two
        ):
            front.hold, front.held_method = asyncio.Event(), "POST"
            users = [(await home_tool(broker, "POST", "/Users", new_user()))[1] for _ in range(9)]
            in_flight = _in_flight_counter(broker, "P1")

            # Up to twice the concurrency get ready; how many depends on how the creates fell
            # into claims (one claim taking two leaves three under way, and the lane claims
            # again only once half have finished), so more than two, never more than four.
            await until(
                lambda count=in_flight: _at_least(count, 3),
                "deliveries ready behind the two in flight",
            )
            await asyncio.sleep(0.3)  # time for a third request to reach the peer, if one could
            assert [m for m, _, _ in front.forwarded] == ["POST", "POST"]
            assert 3 <= await in_flight() <= 4, "no more claimed until half of them have finished"
            front.hold.set()
            await quiesce(broker)
            assert sorted(u["userName"] for u in held(peer)["Users"]) == sorted(
                u["userName"] for u in users
            )
            assert [m for m, _, _ in front.forwarded] == ["POST"] * 9


async def _at_least(count: Callable[[], Awaitable[int]], floor: int) -> bool:
    return await count() >= floor


def _in_flight_counter(broker: Broker, domain: str) -> Callable[[], Awaitable[int]]:
    """How many deliveries toward ``domain`` are claimed, when called."""

    async def in_flight() -> int:
        count: int = await broker.app[POOL].fetchval(
            "SELECT count(*) FROM outbox WHERE domain_id = $1 AND state = 'in_flight'", domain
        )
        return count

    return in_flight


async def test_finished_deliveries_are_purged_after_their_retention_but_not_an_unfinished_operation_s(
    two_peers: tuple[Broker, Home, Home],
) -> None:
    broker, _p1, _p2 = two_peers
    pool = broker.app[POOL]
    users = [(await home_tool(broker, "POST", "/Users", new_user()))[1] for _ in range(6)]
    await quiesce(broker)  # each peer holds both sides of each merge
    operations = []
    for survivor, loser in (users[0:2], users[2:4]):
        status, op, _ = await admin_call(
            broker,
            "POST",
            "/admin/merges",
            {"survivor": survivor["id"], "losers": [loser["id"]], "idempotency_key": unique("m")},
        )
        assert status == 202, op
        operations.append(op["id"])
    await quiesce(broker)
    # A week and a day later; one merge is shown failed (a dead letter a person may retry), and
    # one delivery is a dead letter.
    await pool.execute("UPDATE outbox SET updated_at = now() - interval '8 days'")
    await pool.execute("UPDATE operations SET state = 'failed' WHERE id = $1", operations[1])
    dead = await pool.fetchval(
        "UPDATE outbox SET state = 'dead' WHERE id = (SELECT min(id) FROM outbox "
        "WHERE operation_id IS NULL) RETURNING id"
    )
    _, recent = await home_tool(broker, "POST", "/Users", new_user())
    await quiesce(broker)
    kept_before = await pool.fetch(
        "SELECT id FROM outbox WHERE id = $1 OR operation_id = $2 OR internal_id = $3",
        dead,
        operations[1],
        recent["id"],
    )
    total = await pool.fetchval("SELECT count(*) FROM outbox")
    purged = await broker.app[DELIVERER].purge(batch=3)  # several batches
    assert purged == total - len(kept_before) > 3
    left = await pool.fetch("SELECT id FROM outbox ORDER BY id")
    assert [r["id"] for r in left] == sorted(r["id"] for r in kept_before)
    # The failed operation still counts its deliveries.
    status, op = await admin(broker, "GET", f"/admin/operations/{operations[1]}")
    assert status == 200 and op["progress"]["P1"]["tasks"] == 2
    assert await broker.app[DELIVERER].purge() == 0


async def test_one_read_of_home_serves_a_change_s_deliveries_to_every_peer(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    peers = {f"P{n}": tenant(peer_server, f"p{n}") for n in range(1, 5)}
    async with gate(home) as front:
        watched = Home(front.url, home.token)
        async for broker in federation(
            db_url, watched, {n: p.url for n, p in peers.items()}, monkeypatch, peer_server.token
        ):
            _, user = await home_tool(broker, "POST", "/Users", new_user())
            await quiesce(broker)
            for n in range(3):
                seen = len(front.forwarded)
                change = patch({"op": "replace", "path": "title", "value": f"t{n}"})
                await home_tool(broker, "PATCH", f"/Users/{user['id']}", change)
                await quiesce(broker)
                reads = [
                    p
                    for m, p, _ in front.forwarded[seen:]
                    if (m, p) == ("GET", f"/Users/{user['id']}")
                ]
                # Four peers, four deliveries: one read. Even when the enqueue's commit falls
                # between two peers' claims of one pass, the lanes that found nothing take the
                # change along with the others' claims (claim_riders), in the same pass.
                assert len(reads) == 1, reads
                for name, peer in peers.items():
                    held_id = await peer_id(broker, name, user["id"])
                    assert held_id is not None and peer_user(peer, held_id)["title"] == f"t{n}"
            for peer in peers.values():
                assert_no_internal_id(peer, {user["id"]})


class _Clock:
    """The worker's wall clock, moved by the test (it starts at the real time, so that what the
    worker writes for the database is due when the database says so)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).timestamp()

    def __call__(self) -> float:
        return self.now


async def _own_worker(
    broker: Broker, session: aiohttp.ClientSession, clock: _Clock, **settings: Any
) -> tuple[Deliverer, list[str]]:
    """A worker of the test's (the broker runs none) on the test's clock, and its outcomes."""
    outcomes: list[str] = []
    worker = Deliverer(
        broker.app[POOL],
        broker.app[HOME],
        session,
        id_pattern="[0-9a-f]{32}",
        settings=WorkerSettings(backoff=Backoff(0.01, 0.02), **settings),
        observe=lambda _peer, outcome: outcomes.append(outcome),
        clock=clock,
    )
    return worker, outcomes


async def _next_outcome(worker: Deliverer, outcomes: list[str]) -> str:
    """Claim until one more delivery has ended; how it ended. No claim while a delivery runs:
    on the test's clock a row rescheduled is due at once, and a claim between its reschedule
    and its outcome would start the next attempt before the test looks at the row."""
    seen, deadline = len(outcomes), asyncio.get_running_loop().time() + 30
    while len(outcomes) == seen or worker._tasks:
        assert asyncio.get_running_loop().time() < deadline, "no delivery ended"
        if not worker._tasks:
            await worker.claim_and_start()
        await asyncio.sleep(0.01)
    return outcomes[-1]


async def test_a_409_is_retried_for_its_patience_on_the_workers_clock_then_dead(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The patience runs from the first refusal, as the injected clock tells it: retried while
    the clock stands still (however long the test takes), a dead letter once it moved past."""
    peer = tenant(peer_server, "p1")
    name = unique("taken")
    assert peer.call("POST", "/Users", new_user(name, externalId="theirs"))[0] == 201
    idle = FAST.model_copy(update={"enabled": False})
    async for broker in federation(
        db_url, home, {"P1": peer.url}, monkeypatch, peer_server.token, idle
    ):
        await home_tool(broker, "POST", "/Users", new_user(name))
        clock = _Clock()
        first_refusal = clock.now
        async with aiohttp.ClientSession() as session:
            worker, outcomes = await _own_worker(broker, session, clock, conflict_patience=300)
            for _ in range(3):
                assert await _next_outcome(worker, outcomes) == "retry"
            row = await broker.pool.fetchrow("SELECT state, last_error FROM outbox")
            assert row["state"] == "pending"
            assert row["last_error"]["conflict_since"] == first_refusal
            clock.now += 301  # past the patience (300 s exactly is at float rounding's mercy)
            assert await _next_outcome(worker, outcomes) == "dead"
            row = await broker.pool.fetchrow("SELECT state, last_error FROM outbox")
            assert row["state"] == "dead" and row["last_error"]["status"] == 409
            assert row["last_error"]["conflict_since"] == first_refusal


async def test_a_suspended_account_is_deleted_once_the_workers_clock_passes_suspend_for(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = tenant(peer_server, "p1")
    idle = FAST.model_copy(update={"enabled": False})
    async for broker in federation(
        db_url,
        home,
        {"P1": peer.url},
        monkeypatch,
        peer_server.token,
        idle,
        deprovision="suspend",
        suspend_for=timedelta(hours=1),
    ):
        clock = _Clock()
        _, user = await home_tool(broker, "POST", "/Users", new_user(active=True))
        async with aiohttp.ClientSession() as session:
            worker, _ = await _own_worker(broker, session, clock)
            await worker.drain()
            held_id = await peer_id(broker, "P1", user["id"])
            assert held_id is not None
            assert (await home_tool(broker, "DELETE", f"/Users/{user['id']}"))[0] == 204
            await worker.drain()
            assert peer_user(peer, held_id)["active"] is False, "suspended first"
            due = await broker.pool.fetchval(
                "SELECT next_attempt_at FROM outbox WHERE state = 'pending'"
            )
            assert due == datetime.fromtimestamp(clock.now, UTC) + timedelta(hours=1)
            an_hour_passes_in_the_database = (
                "UPDATE outbox SET next_attempt_at = now() WHERE state = 'pending'"
            )

            clock.now += 3599
            await broker.pool.execute(an_hour_passes_in_the_database)
            await worker.drain()
            assert peer_user(peer, held_id)["active"] is False, "not yet on the worker's clock"
            assert await peer_id(broker, "P1", user["id"]) == held_id
            clock.now += 2  # past suspend_for, clear of microsecond rounding
            await broker.pool.execute(an_hour_passes_in_the_database)
            await worker.drain()
            assert peer.call("GET", f"/Users/{held_id}")[0] == 404, "deleted after --suspend-for"
            assert await peer_id(broker, "P1", user["id"]) is None


async def test_a_worker_cancelled_just_as_it_is_woken_stops(
    db_url: str, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that arrives while the loop waits, just after something woke it, stops the loop
    (``asyncio.wait_for`` of Python 3.11 returned the wake-up instead and dropped the cancel: the
    broker's shutdown then waited for the worker for ever)."""
    idle = FAST.model_copy(update={"enabled": False})
    async for broker in federation(db_url, home, {}, monkeypatch, "", idle):
        async with aiohttp.ClientSession() as session:
            worker = Deliverer(
                broker.app[POOL],
                broker.app[HOME],
                session,
                id_pattern="[0-9a-f]{32}",
                settings=WorkerSettings(idle_check=60),
            )
            running = asyncio.create_task(worker.run())
            deadline = asyncio.get_running_loop().time() + 30
            while not worker._wake._waiters:  # type: ignore[attr-defined]
                assert asyncio.get_running_loop().time() < deadline, "the loop never waited"
                await asyncio.sleep(0.01)
            worker._wake.set()
            running.cancel()
            done, _ = await asyncio.wait({running}, timeout=10)
            if not done:
                running.cancel()
            assert done == {running}, "the worker went on after it was cancelled"
            assert running.cancelled()
