"""Merge and split, end to end: seed 002's two stories and the hard cases, with a real home, two
real push peers (tenants of a real scim2-server) and the broker's own worker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.mapping.store import MappingStore
from tests.propagation_support import (
    FAST,
    Gate,
    admin,
    admin_call,
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

# The seed's final tables drop a deleted alias's row: no retention here.
SEED = FAST.model_copy(update={"retention": 0})

Row = tuple[str, str, str | None, bool, str]


async def table(broker: Broker, *entities: str) -> set[Row]:
    """The mapping rows of ``entities`` in the peers, as the seed draws them."""
    rows = await MappingStore(broker.pool).rows_of(list(entities))
    return {
        (r.internal_id, r.domain, r.external_id, r.primary, r.state.value)
        for r in rows
        if r.domain.startswith("P")
    }


async def person(broker: Broker, display: str) -> dict[str, Any]:
    status, user = await home_tool(
        broker, "POST", "/Users", new_user(unique("jsmith"), displayName=display)
    )
    assert status == 201, user
    return user


async def merge(broker: Broker, survivor: str, *losers: str, key: str | None = None) -> str:
    status, op, headers = await admin_call(
        broker,
        "POST",
        "/admin/merges",
        {"survivor": survivor, "losers": list(losers), "idempotency_key": key or unique("m")},
    )
    assert status == 202, op
    assert headers["Location"].endswith(f"/admin/operations/{op['id']}")
    return str(op["id"])


async def split(broker: Broker, source: str, *new: str, **options: Any) -> str:
    body = {"source": source, "new": list(new), "idempotency_key": unique("s"), **options}
    status, op, _ = await admin_call(broker, "POST", "/admin/splits", body)
    assert status == 202, op
    return str(op["id"])


async def operation(broker: Broker, op_id: str) -> dict[str, Any]:
    status, op = await admin(broker, "GET", f"/admin/operations/{op_id}")
    assert status == 200, op
    return op


def deliveries(front: Gate, since: int) -> list[tuple[str, str]]:
    """What the peer behind ``front`` received since the ``since``-th request: changes only."""
    return [(m, p) for m, p, _ in front.forwarded[since:] if m != "GET"]


@pytest.fixture
async def federated(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Broker, Home, Home, Gate]]:
    """Home, peers P1 and P2 (P2 behind a gate the test can close), the broker."""
    p1, p2 = tenant(peer_server, "p1"), tenant(peer_server, "p2")
    async with gate(p2) as front:
        async for broker in federation(
            db_url, home, {"P1": p1.url, "P2": front.url}, monkeypatch, peer_server.token, SEED
        ):
            yield broker, p1, p2, front


async def test_false_negative_two_customers_merged_as_the_seed_shows(
    federated: tuple[Broker, Home, Home, Gate],
) -> None:
    broker, p1, p2, front = federated
    jsmith = await person(broker, "JSmith")
    johns = await person(broker, "JohnS")
    await quiesce(broker)
    s1, s2 = await peer_id(broker, "P1", jsmith["id"]), await peer_id(broker, "P2", jsmith["id"])
    l1, l2 = await peer_id(broker, "P1", johns["id"]), await peer_id(broker, "P2", johns["id"])
    assert await table(broker, jsmith["id"], johns["id"]) == {
        (jsmith["id"], "P1", s1, True, "active"),
        (jsmith["id"], "P2", s2, True, "active"),
        (johns["id"], "P1", l1, True, "active"),
        (johns["id"], "P2", l2, True, "active"),
    }

    # P2 is down while the merge happens: the table changes at once, P2 follows later.
    await front.close()
    seen = len(front.forwarded)
    op_id = await merge(broker, jsmith["id"], johns["id"])
    assert await table(broker, jsmith["id"], johns["id"]) >= {
        (jsmith["id"], "P2", s2, True, "active"),
        (jsmith["id"], "P2", l2, False, "deletion_required"),
    }
    # Inbound, the alias already resolves to the survivor: P2 reading its old ID gets the
    # surviving resource, under its primary ID.
    status, read, _ = await broker.call("P2", "GET", f"/Users/{l2}")
    assert status == 200 and read["id"] == s2 and read["userName"] == jsmith["userName"]
    op = await operation(broker, op_id)
    assert op["state"] == "propagating" and op["progress"]["P2"]["state"] != "done"

    await front.open()
    await quiesce(broker)
    # The seed's final table: the alias's row is gone once the peer acknowledged the delete.
    assert await table(broker, jsmith["id"], johns["id"]) == {
        (jsmith["id"], "P1", s1, True, "active"),
        (jsmith["id"], "P2", s2, True, "active"),
    }
    # P2 received the delete of the non-primary, and nothing else.
    assert deliveries(front, seen) == [("DELETE", f"/Users/{l2}")]
    for peer, kept in ((p1, s1), (p2, s2)):
        assert [u["id"] for u in held(peer)["Users"]] == [kept]
        assert_no_internal_id(peer, {jsmith["id"], johns["id"]})
    op = await operation(broker, op_id)
    assert op["state"] == "done"
    assert {d: p["state"] for d, p in op["progress"].items()} == {"P1": "done", "P2": "done"}


async def test_false_positive_split_is_invisible_to_peers_until_provisioned(
    federated: tuple[Broker, Home, Home, Gate], home: Home
) -> None:
    broker, p1, p2, _front = federated
    john = await person(broker, "John Smith")
    await quiesce(broker)
    j1, j2 = await peer_id(broker, "P1", john["id"]), await peer_id(broker, "P2", john["id"])

    # The split's new entity, created in home (not through the broker).
    status, other = home.call(
        "POST", "/Users", new_user(unique("jsmith"), displayName="John Smith")
    )
    assert status == 201
    op_id = await split(broker, john["id"], other["id"])
    await quiesce(broker)
    assert (await operation(broker, op_id))["state"] == "done"
    assert await table(broker, john["id"], other["id"]) == {
        (john["id"], "P1", j1, True, "active"),
        (john["id"], "P2", j2, True, "active"),
    }
    # Invisible to the peers, by design: even a change of it in home sends nothing.
    await home_tool(
        broker,
        "PATCH",
        f"/Users/{other['id']}",
        patch({"op": "replace", "path": "title", "value": "split off"}),
    )
    await quiesce(broker)
    for name, peer in (("P1", p1), ("P2", p2)):
        assert [u["id"] for u in held(peer)["Users"]] == [await peer_id(broker, name, john["id"])]

    # First need: a group naming it is delivered; it is provisioned first, its ID recorded.
    status, group = await home_tool(
        broker,
        "POST",
        "/Groups",
        {"schemas": [CORE_GROUP], "displayName": unique("g"), "members": [{"value": other["id"]}]},
    )
    assert status == 201, group
    await quiesce(broker)
    o1, o2 = await peer_id(broker, "P1", other["id"]), await peer_id(broker, "P2", other["id"])
    assert o1 and o2
    assert await table(broker, john["id"], other["id"]) == {
        (john["id"], "P1", j1, True, "active"),
        (john["id"], "P2", j2, True, "active"),
        (other["id"], "P1", o1, True, "active"),
        (other["id"], "P2", o2, True, "active"),
    }
    assert peer_user(p2, o2)["title"] == "split off"
    for peer in (p1, p2):
        assert_no_internal_id(peer, {john["id"], other["id"], group["id"]})


async def test_an_eager_three_way_split_provisions_the_new_entities_in_the_background(
    federated: tuple[Broker, Home, Home, Gate], home: Home
) -> None:
    broker, p1, p2, _front = federated
    source = await person(broker, "John Smith")
    await quiesce(broker)
    new = [home.call("POST", "/Users", new_user(unique("jsmith")))[1]["id"] for _ in range(2)]
    op_id = await split(broker, source["id"], *new, provision="eager")
    await quiesce(broker)
    assert (await operation(broker, op_id))["state"] == "done"
    for name, peer in (("P1", p1), ("P2", p2)):
        ids = [await peer_id(broker, name, i) for i in (source["id"], *new)]
        assert all(ids) and len(set(ids)) == 3
        assert sorted(u["id"] for u in held(peer)["Users"]) == sorted(ids)
        assert_no_internal_id(peer, {source["id"], *new})


async def test_a_three_way_merge_and_then_a_merge_chain(
    federated: tuple[Broker, Home, Home, Gate],
) -> None:
    broker, p1, p2, _front = federated
    a, b, c, d = [await person(broker, n) for n in ("A", "B", "C", "D")]
    await quiesce(broker)
    await merge(broker, a["id"], b["id"], c["id"])
    await quiesce(broker)
    for name, peer in (("P1", p1), ("P2", p2)):
        assert [u["id"] for u in held(peer)["Users"] if u["displayName"] != "D"] == [
            await peer_id(broker, name, a["id"])
        ]
    # The chain: A (with B and C merged into it) is merged into D. Everything lives on in D.
    await merge(broker, d["id"], a["id"])
    await quiesce(broker)
    final = await table(broker, a["id"], b["id"], c["id"], d["id"])
    assert final == {
        (d["id"], "P1", await peer_id(broker, "P1", d["id"]), True, "active"),
        (d["id"], "P2", await peer_id(broker, "P2", d["id"]), True, "active"),
    }
    merged_into = await broker.pool.fetch(
        "SELECT internal_id, merged_into FROM entities WHERE state = 'merged'"
    )
    assert {r["internal_id"]: r["merged_into"] for r in merged_into} == {
        a["id"]: d["id"],
        b["id"]: d["id"],
        c["id"]: d["id"],
    }
    for peer in (p1, p2):
        assert [u["displayName"] for u in held(peer)["Users"]] == ["D"]
        assert_no_internal_id(peer, {a["id"], b["id"], c["id"], d["id"]})


async def test_a_merge_undone_by_a_split_keeps_the_alias_and_cancels_its_delete(
    federated: tuple[Broker, Home, Home, Gate], home: Home
) -> None:
    broker, p1, p2, front = federated
    jsmith, johns = await person(broker, "JSmith"), await person(broker, "JohnS")
    await quiesce(broker)
    s2, l2 = await peer_id(broker, "P2", jsmith["id"]), await peer_id(broker, "P2", johns["id"])
    await front.close()
    merge_id = await merge(broker, jsmith["id"], johns["id"])
    # It was a mistake: JohnS is someone else. Home gives them a new identity, and the split
    # moves P2's alias to it.
    status, again = home.call(
        "POST", "/Users", new_user(unique("johns"), displayName="JohnS again")
    )
    assert status == 201
    seen = len(front.forwarded)
    await split(broker, jsmith["id"], again["id"], move={"P2": [l2]})
    assert await table(broker, jsmith["id"], again["id"]) >= {
        (jsmith["id"], "P2", s2, True, "active"),
        (again["id"], "P2", l2, True, "active"),
    }
    await front.open()
    await quiesce(broker)
    sent = deliveries(front, seen)
    assert ("DELETE", f"/Users/{l2}") not in sent, "the pending delete was cancelled"
    assert sorted(u["id"] for u in held(p2)["Users"]) == sorted([s2, l2])
    assert peer_user(p2, l2)["displayName"] == "JohnS again", "the account follows its new owner"
    merge_op = await operation(broker, merge_id)
    assert merge_op["state"] == "done" and merge_op["progress"]["P2"]["state"] == "done"
    for peer in (p1, p2):
        assert_no_internal_id(peer, {jsmith["id"], johns["id"], again["id"]})


async def test_merging_an_entity_whose_create_is_still_pending_in_a_peer(
    federated: tuple[Broker, Home, Home, Gate],
) -> None:
    broker, p1, p2, front = federated
    survivor = await person(broker, "Survivor")
    await quiesce(broker)
    await front.close()
    loser = await person(broker, "Loser")
    await create_failed(broker, "P2", loser["id"])
    pending = await broker.pool.fetchval(
        "SELECT state FROM id_mappings WHERE domain_id = 'P2' AND internal_id = $1", loser["id"]
    )
    assert pending == "pending_create"
    await merge(broker, survivor["id"], loser["id"])
    await front.open()
    await quiesce(broker)
    assert [u["displayName"] for u in held(p2)["Users"]] == ["Survivor"], "never created there"
    assert [u["displayName"] for u in held(p1)["Users"]] == ["Survivor"], "deleted there"
    for peer in (p1, p2):
        assert_no_internal_id(peer, {survivor["id"], loser["id"]})


async def test_a_create_in_flight_when_its_entity_is_merged_is_undone(
    federated: tuple[Broker, Home, Home, Gate],
) -> None:
    broker, _p1, p2, front = federated
    survivor = await person(broker, "Survivor")
    await quiesce(broker)
    front.hold, front.held_method = asyncio.Event(), "POST"
    seen = len(front.forwarded)
    loser = await person(broker, "Loser")
    await wait_for(lambda: ("POST", "/Users") in deliveries(front, seen))
    await merge(broker, survivor["id"], loser["id"])  # while P2's answer is on its way
    front.hold.set()
    await quiesce(broker)
    made = [u for u in held(p2)["Users"]]
    assert [u["displayName"] for u in made] == ["Survivor"], (
        "the create it no longer wants is undone"
    )
    sent = deliveries(front, seen)
    assert [m for m, _ in sent] == ["POST", "DELETE"]
    assert_no_internal_id(p2, {survivor["id"], loser["id"]})


async def test_a_delivery_for_a_loser_in_flight_finishes_before_its_alias_is_deleted(
    federated: tuple[Broker, Home, Home, Gate],
) -> None:
    broker, _p1, p2, front = federated
    survivor, loser = await person(broker, "Survivor"), await person(broker, "Loser")
    await quiesce(broker)
    l2 = await peer_id(broker, "P2", loser["id"])
    # A first update, so that P2's ServiceProviderConfig (PATCH supported?) is known already.
    await home_tool(
        broker,
        "PATCH",
        f"/Users/{loser['id']}",
        patch({"op": "replace", "path": "title", "value": "early"}),
    )
    await quiesce(broker)
    front.hold = asyncio.Event()
    seen = len(front.forwarded)
    await home_tool(
        broker,
        "PATCH",
        f"/Users/{loser['id']}",
        patch({"op": "replace", "path": "title", "value": "late"}),
    )
    await wait_for(lambda: ("PATCH", f"/Users/{l2}") in deliveries(front, seen))
    await merge(broker, survivor["id"], loser["id"])
    # A later delivery toward P2 done proves the worker claimed after the merge: claims take
    # the oldest ready deliveries first, so the alias's delete was not ready then.
    probe = await person(broker, "Probe")
    await delivered(broker, "P2", probe["id"])
    assert ("DELETE", f"/Users/{l2}") not in deliveries(front, seen), "waits for the PATCH"
    front.hold.set()
    await quiesce(broker)
    assert deliveries(front, seen) == [
        ("PATCH", f"/Users/{l2}"),
        ("POST", "/Users"),  # the probe
        ("DELETE", f"/Users/{l2}"),
    ]
    assert sorted(u["displayName"] for u in held(p2)["Users"]) == ["Probe", "Survivor"]


async def test_two_merges_of_one_entity_at_once_are_serialised(
    federated: tuple[Broker, Home, Home, Gate],
) -> None:
    broker, _p1, _p2, _front = federated
    a, b, x = [await person(broker, n) for n in ("A", "B", "X")]
    await quiesce(broker)
    # X into A and X into B at once: one wins, the other is told X is merged.
    first = await asyncio.wait_for(
        asyncio.gather(
            admin(broker, "POST", "/admin/merges", merge_body(a["id"], x["id"])),
            admin(broker, "POST", "/admin/merges", merge_body(b["id"], x["id"])),
        ),
        timeout=30,
    )
    assert sorted(status for status, _ in first) == [202, 409]
    refused = next(body for status, body in first if status == 409)
    assert "was merged into" in refused["detail"] and refused["scimType"] == "mutability"
    # A into B and B into A at once: no deadlock, one of them.
    second = await asyncio.wait_for(
        asyncio.gather(
            admin(broker, "POST", "/admin/merges", merge_body(a["id"], b["id"])),
            admin(broker, "POST", "/admin/merges", merge_body(b["id"], a["id"])),
        ),
        timeout=30,
    )
    statuses = sorted(status for status, _ in second)
    assert statuses == [202, 409], second
    await quiesce(broker)


def merge_body(survivor: str, *losers: str) -> dict[str, Any]:
    return {"survivor": survivor, "losers": list(losers), "idempotency_key": unique("m")}


async def test_the_same_key_is_the_same_operation_and_bad_requests_change_nothing(
    federated: tuple[Broker, Home, Home, Gate],
) -> None:
    broker, _p1, _p2, _front = federated
    a, b = await person(broker, "A"), await person(broker, "B")
    await quiesce(broker)
    body = merge_body(a["id"], b["id"])
    status, first = await admin(broker, "POST", "/admin/merges", body)
    status2, again = await admin(broker, "POST", "/admin/merges", body)
    assert (status, status2) == (202, 202)
    assert again["id"] == first["id"] and again["replayed"] is True
    status, reused = await admin(
        broker, "POST", "/admin/merges", {**body, "losers": [a["id"]], "survivor": b["id"]}
    )
    assert status == 409 and "idempotency key" in reused["detail"]

    before = await broker.pool.fetchval("SELECT count(*) FROM outbox")
    c = await person(broker, "C")
    await quiesce(broker)
    before = await broker.pool.fetchval("SELECT count(*) FROM outbox")
    rows_before = await table(broker, c["id"])
    cases = [
        ({"losers": [c["id"]], "idempotency_key": "k1"}, 400, "survivor"),
        ({"survivor": c["id"], "losers": [], "idempotency_key": "k2"}, 400, "losers"),
        ({"survivor": c["id"], "losers": [c["id"]], "idempotency_key": "k3"}, 400, "both sides"),
        ({"survivor": c["id"], "losers": ["nobody"], "idempotency_key": "k4"}, 404, "never seen"),
        ({"survivor": c["id"], "losers": [a["id"]]}, 400, "idempotency_key"),
    ]
    for request, expected, words in cases:
        status, error = await admin(broker, "POST", "/admin/merges", request)
        assert status == expected, (request, error)
        assert words in error["detail"], error
        assert error["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    status, error = await admin(
        broker,
        "POST",
        "/admin/splits",
        {
            "source": c["id"],
            "new": [str(uuid.uuid4())],
            "provision": "later",
            "idempotency_key": "k5",
        },
    )
    assert status == 400 and "eager" in error["detail"]
    status, error = await admin(
        broker, "POST", "/admin/merges", merge_body(c["id"], a["id"]), token=""
    )
    assert status == 401
    assert await broker.pool.fetchval("SELECT count(*) FROM outbox") == before
    assert await table(broker, c["id"]) == rows_before


async def wait_for(condition: Any) -> None:
    await until(condition, "the condition")


async def create_failed(broker: Broker, domain: str, internal_id: str) -> None:
    """Until the create of ``internal_id`` toward ``domain`` was tried and failed (pending)."""
    await until(
        lambda: broker.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE domain_id = $1 AND internal_id = $2 "
            "AND state = 'pending' AND last_error IS NOT NULL)",
            domain,
            internal_id,
        ),
        f"a failed create of {internal_id} toward {domain}",
    )


async def delivered(broker: Broker, domain: str, internal_id: str) -> None:
    """Until every delivery of ``internal_id`` toward ``domain`` is done."""
    await until(
        lambda: broker.pool.fetchval(
            "SELECT bool_and(state = 'done') FROM outbox WHERE domain_id = $1 AND internal_id = $2",
            domain,
            internal_id,
        ),
        f"{internal_id} delivered to {domain}",
    )


async def test_the_cli_merges_splits_and_shows_progress_and_tables(
    federated: tuple[Broker, Home, Home, Gate], db_url: str, home: Home
) -> None:
    broker, _p1, p2, _front = federated
    jsmith, johns = await person(broker, "JSmith"), await person(broker, "JohnS")
    await quiesce(broker)
    l2 = await peer_id(broker, "P2", johns["id"])
    code, out = await cli(db_url, "merge", jsmith["id"], johns["id"], "--wait")
    assert code == 0, out
    assert "merge recorded (idempotency key" in out
    assert "| P2     | done  | 2/2" in out, out
    code, out = await cli(db_url, "mappings", f"P1:{await peer_id(broker, 'P1', jsmith['id'])}")
    assert code == 0 and out.count(jsmith["id"]) == 2, out  # P1 and P2, primaries
    code, out = await cli(db_url, "mappings", johns["id"])
    assert code == 1 and "no mapping rows" in out
    assert l2 not in {u["id"] for u in held(p2)["Users"]}

    status, other = home.call("POST", "/Users", new_user(unique("jsmith")))
    assert status == 201
    code, out = await cli(db_url, "split", jsmith["id"], other["id"], "--move", "P2:nope")
    assert code == 1 and "P2:nope is not mapped to" in out, out
    code, out = await cli(db_url, "split", jsmith["id"], other["id"], "--move", "P2")
    assert code == 1 and "write DOMAIN:EXTERNAL_ID" in out, out
    code, out = await cli(
        db_url, "split", jsmith["id"], other["id"], "--provision", "eager", "--wait"
    )
    assert code == 0 and "split" in out and "done" in out, out
    assert await peer_id(broker, "P2", other["id"]) in {u["id"] for u in held(p2)["Users"]}
    code, out = await cli(db_url, "operations")
    assert code == 0 and out.count("| done") == 2, out
    op_id = out.splitlines()[2].split("|")[1].strip()
    code, out = await cli(db_url, "operations", op_id)
    assert code == 0 and f"{op_id}: done" in out


async def test_a_split_off_is_provisioned_in_a_peer_that_reads_it_and_only_there(
    federated: tuple[Broker, Home, Home, Gate], home: Home
) -> None:
    broker, p1, p2, _front = federated
    john = await person(broker, "John Smith")
    await quiesce(broker)
    status, other = home.call("POST", "/Users", new_user(unique("jsmith")))
    assert status == 201
    await split(broker, john["id"], other["id"])
    await quiesce(broker)
    status, page, _ = await broker.call(
        "P2", "GET", f'/Users?filter=userName eq "{other["userName"]}"'
    )
    assert status == 200 and page["Resources"] == [], "no account there yet: nothing to show"
    await quiesce(broker)
    o2 = await peer_id(broker, "P2", other["id"])
    assert o2 in {u["id"] for u in held(p2)["Users"]}, "provisioned on P2's first need"
    assert await peer_id(broker, "P1", other["id"]) is None, "P1 needed nothing"
    assert len(held(p1)["Users"]) == 1
    status, page, _ = await broker.call(
        "P2", "GET", f'/Users?filter=userName eq "{other["userName"]}"'
    )
    assert [r["id"] for r in page["Resources"]] == [o2]
    assert_no_internal_id(p2, {john["id"], other["id"]})


async def dead_letters(broker: Broker) -> list[dict[str, Any]]:
    rows = await broker.pool.fetch(
        "SELECT domain_id, kind, last_error FROM outbox WHERE state = 'dead' ORDER BY id"
    )
    return [dict(r) for r in rows]


async def test_an_alias_waiting_for_its_delete_gives_up_a_value_its_entity_needs(
    federated: tuple[Broker, Home, Home, Gate], home: Home
) -> None:
    broker, _p1, p2, front = federated
    x, loser = await person(broker, "X"), await person(broker, "L")
    await quiesce(broker)
    x2, l2 = await peer_id(broker, "P2", x["id"]), await peer_id(broker, "P2", loser["id"])
    await front.close()
    await merge(broker, x["id"], loser["id"])  # l2: X's alias
    status, n = home.call("POST", "/Users", new_user(unique("n"), displayName="N"))
    assert status == 201
    # x2 goes to N; X's alias l2 becomes its primary again (X's userName must move onto it).
    await split(broker, x["id"], n["id"], move={"P2": [x2]})
    # N is X after all: x2, which still holds X's userName, is X's alias, its delete queued
    # behind X's own sync to l2.
    await merge(broker, x["id"], n["id"])
    assert await table(broker, x["id"]) >= {
        (x["id"], "P2", l2, True, "active"),
        (x["id"], "P2", x2, False, "deletion_required"),
    }
    await front.open()
    await quiesce(broker)
    assert await dead_letters(broker) == []
    assert [(u["id"], u["userName"]) for u in held(p2)["Users"]] == [(l2, x["userName"])]


async def test_a_group_written_while_its_member_is_deleted_is_synced_again(
    federated: tuple[Broker, Home, Home, Gate],
) -> None:
    broker, _p1, p2, front = federated
    member = await person(broker, "Member")
    await quiesce(broker)
    m2 = await peer_id(broker, "P2", member["id"])
    front.hold, front.held_method = asyncio.Event(), "POST"
    seen = len(front.forwarded)
    group = {
        "schemas": [CORE_GROUP],
        "displayName": unique("g"),
        "members": [{"value": member["id"]}],
    }
    status, created = await home_tool(broker, "POST", "/Groups", group)
    assert status == 201, created
    # P2 makes the group, naming m2; its answer is held while the member goes.
    await wait_for(lambda: ("POST", "/Groups") in deliveries(front, seen))
    status, _ = await home_tool(broker, "DELETE", f"/Users/{member['id']}")
    assert status == 204
    await wait_for(lambda: ("DELETE", f"/Users/{m2}") in deliveries(front, seen))
    # The member's row is retired, and no copy named it yet.
    await until(
        lambda: broker.pool.fetchval(
            "SELECT NOT EXISTS (SELECT 1 FROM id_mappings WHERE domain_id = 'P2' "
            "AND external_id = $1 AND state <> 'retired')",
            m2,
        ),
        "the deleted member's row retired",
    )
    front.hold.set()
    await quiesce(broker)
    assert held(p2)["Users"] == []
    assert [g.get("members", []) for g in held(p2)["Groups"]] == [[]]


async def test_a_group_naming_a_merged_split_off_provisions_its_survivor(
    federated: tuple[Broker, Home, Home, Gate], home: Home
) -> None:
    broker, _p1, p2, _front = federated
    source = await person(broker, "Source")
    await quiesce(broker)
    offs = []
    for _ in range(2):
        status, off = home.call("POST", "/Users", new_user(unique("off")))
        assert status == 201
        await split(broker, source["id"], off["id"])  # held back: no account anywhere
        offs.append(off)
    survivor, loser = offs
    await merge(broker, survivor["id"], loser["id"])
    group = {
        "schemas": [CORE_GROUP],
        "displayName": unique("g"),
        "members": [{"value": loser["id"]}],
    }
    status, created = await home_tool(broker, "POST", "/Groups", group)
    assert status == 201, created
    await quiesce(broker, within=10)
    s2 = await peer_id(broker, "P2", survivor["id"])
    assert s2 is not None, "the group needs it there: the survivor is provisioned"
    assert [g["members"] for g in held(p2)["Groups"]] == [[{"value": s2}]]


async def test_a_pending_create_handed_to_a_survivor_is_finished_as_its_account(
    federated: tuple[Broker, Home, Home, Gate], home: Home
) -> None:
    broker, p1, p2, front = federated
    source = await person(broker, "Source")
    await quiesce(broker)
    status, off = home.call("POST", "/Users", new_user(unique("off"), displayName="Off"))
    assert status == 201
    await split(broker, source["id"], off["id"])  # held back: no account anywhere
    await front.close()
    loser = await person(broker, "Loser")
    await create_failed(broker, "P2", loser["id"])
    pending = await broker.pool.fetchval(
        "SELECT state FROM id_mappings WHERE domain_id = 'P2' AND internal_id = $1", loser["id"]
    )
    assert pending == "pending_create"
    # P1's account and P2's create on its way both move to the split-off.
    await merge(broker, off["id"], loser["id"])
    await front.open()
    await quiesce(broker)
    for peer in ("P1", "P2"):
        assert await peer_id(broker, peer, off["id"]) is not None, peer
    for peer in (p1, p2):
        names = sorted(u["userName"] for u in held(peer)["Users"])
        assert names == sorted([source["userName"], off["userName"]])


async def loser_and_other_in_a_group(
    broker: Broker,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """People S (to survive a merge), L (to lose it) and B; a group naming L and B, as sent to
    home and as home answered; everything delivered."""
    survivor, loser, other = [await person(broker, n) for n in ("S", "L", "B")]
    members = [{"value": loser["id"]}, {"value": other["id"]}]
    group = {"schemas": [CORE_GROUP], "displayName": unique("g"), "members": members}
    status, created = await home_tool(broker, "POST", "/Groups", group)
    assert status == 201, created
    await quiesce(broker)
    return survivor, loser, other, group, created


async def test_a_group_sync_racing_a_membership_move_leaves_no_stale_member(
    federated: tuple[Broker, Home, Home, Gate],
) -> None:
    broker, _p1, p2, front = federated
    survivor, loser, other, group, created = await loser_and_other_in_a_group(broker)
    members = group["members"]
    g2, b2 = [await peer_id(broker, "P2", e["id"]) for e in (created, other)]
    # The group's sync (a rename) reaches P2, its answer held: its copy is not recorded yet.
    renamed, moved = asyncio.Event(), asyncio.Event()
    front.hold, front.held_method = renamed, "PATCH"
    seen = len(front.forwarded)
    renaming = group | {"displayName": unique("g"), "members": members}
    status, _ = await home_tool(broker, "PUT", f"/Groups/{created['id']}", renaming)
    assert status == 200
    await wait_for(lambda: deliveries(front, seen).count(("PATCH", f"/Groups/{g2}")) == 1)
    # The merge's membership move changes the same group in P2 (its answer held apart).
    front.hold = moved
    await merge(broker, survivor["id"], loser["id"])
    await wait_for(lambda: deliveries(front, seen).count(("PATCH", f"/Groups/{g2}")) == 2)
    status, _ = await home_tool(
        broker, "PUT", f"/Groups/{created['id']}", renaming | {"members": members[1:]}
    )
    assert status == 200
    # The move records its copy first, then the rename records the one it computed before.
    moved.set()
    await wait_for_row(broker, "move_memberships", "done")
    renamed.set()
    await quiesce(broker)
    assert [[m["value"] for m in g["members"]] for g in held(p2)["Groups"]] == [[b2]]


async def wait_for_row(broker: Broker, kind: str, state: str) -> None:
    await until(
        lambda: broker.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE kind = $1 AND state = $2)", kind, state
        ),
        f"a {kind} delivery {state}",
    )


async def test_a_split_taking_the_survivor_s_account_during_a_membership_move_resyncs_the_group(
    federated: tuple[Broker, Home, Home, Gate], home: Home
) -> None:
    broker, _p1, p2, front = federated
    survivor, loser, other, _group, created = await loser_and_other_in_a_group(broker)
    g2, s2, b2 = [await peer_id(broker, "P2", e["id"]) for e in (created, survivor, other)]
    # The merge's membership move PATCHes the group in P2 to name s2, its answer held.
    front.hold, front.held_method = asyncio.Event(), "PATCH"
    seen = len(front.forwarded)
    await merge(broker, survivor["id"], loser["id"])
    await wait_for(lambda: ("PATCH", f"/Groups/{g2}") in deliveries(front, seen))
    # Meanwhile a split hands s2 over to a new entity: the group now names that entity's
    # account, not the survivor's.
    status, newcomer = home.call("POST", "/Users", new_user(unique("n"), displayName="N"))
    assert status == 201
    await split(broker, survivor["id"], newcomer["id"], move={"P2": [s2]})
    front.hold.set()
    await quiesce(broker)
    again = await peer_id(broker, "P2", survivor["id"])
    assert again is not None and again != s2, "the survivor got an account of its own"
    assert await peer_id(broker, "P2", newcomer["id"]) == s2
    (held_group,) = [g for g in held(p2)["Groups"] if g["id"] == g2]
    assert sorted(m["value"] for m in held_group["members"]) == sorted([again, b2])
    assert_no_internal_id(p2, {survivor["id"], loser["id"], other["id"], newcomer["id"]})
