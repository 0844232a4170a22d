"""Provisioning on demand (RFC 7642 section 2.3.4): ``POST {admin}/admin/provision`` and
``broker provision`` create one entity in a push peer now, through the outbox, and answer with
the peer's ID; a real home and a real peer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker.app import DB_URL, DELIVERER, POOL
from broker.mapping.store import MappingStore
from tests.propagation_support import (
    admin,
    assert_no_internal_id,
    cli,
    federation,
    home_ids,
    peer_user,
    tenant,
)
from tests.scim_support import Broker, Home, new_user
from tests.waiting import until


@pytest.fixture
async def one_peer(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Broker, Home]]:
    p1 = tenant(peer_server, "p1")
    async for broker in federation(db_url, home, {"P1": p1.url}, monkeypatch, peer_server.token):
        yield broker, p1


async def _seen_in_home(broker: Broker, **attributes: str) -> dict[str, str]:
    """A user made in home directly (no peer has it), which the broker has seen."""
    status, user = broker.home.call("POST", "/Users", new_user(**attributes))
    assert status == 201, user
    await MappingStore(broker.app[POOL]).register_entities({user["id"]: "User"})
    return user  # type: ignore[no-any-return]


async def test_provisioning_on_demand_answers_the_peers_id_once_and_for_good(
    one_peer: tuple[Broker, Home],
) -> None:
    broker, p1 = one_peer
    alice = await _seen_in_home(broker, displayName="Alice")
    assert (
        await broker.app[POOL].fetchval(
            "SELECT count(*) FROM id_mappings WHERE internal_id = $1", alice["id"]
        )
        == 0
    )
    status, answer = await admin(
        broker, "POST", "/admin/provision", {"domain": "P1", "entity": alice["id"]}
    )
    assert status == 201, answer
    assert answer["created"] is True and answer["entity"] == alice["id"]
    peer_side = answer["id"]
    assert peer_side != alice["id"]
    held = peer_user(p1, peer_side)
    assert held["userName"] == alice["userName"]
    assert_no_internal_id(p1, home_ids(broker.home))
    row = await broker.app[POOL].fetchrow(
        "SELECT external_id, is_primary, state FROM id_mappings"
        " WHERE internal_id = $1 AND domain_id = 'P1'",
        alice["id"],
    )
    assert tuple(row) == (peer_side, True, "active")

    again = await admin(broker, "POST", "/admin/provision", {"domain": "P1", "entity": alice["id"]})
    assert again == (200, answer | {"created": False})
    by_peer_id = await admin(
        broker, "POST", "/admin/provision", {"domain": "P1", "entity": f"P1:{peer_side}"}
    )
    assert by_peer_id == (200, answer | {"created": False})
    code, out = await cli(broker_db(broker), "provision", "P1", alice["id"])
    assert code == 0 and out.strip().splitlines()[-1] == peer_side, out
    status, users = p1.call("GET", "/Users")
    assert status == 200 and users["totalResults"] == 1, "one account, however often asked"


def broker_db(broker: Broker) -> str:
    return broker.app[DB_URL]


async def test_provisioning_refuses_what_it_cannot_do_and_changes_nothing(
    one_peer: tuple[Broker, Home],
) -> None:
    broker, p1 = one_peer
    bob = await _seen_in_home(broker, displayName="Bob")
    cases = [
        ({"domain": "NOPE", "entity": bob["id"]}, 404, "there is no domain NOPE"),
        ({"domain": "D", "entity": bob["id"]}, 400, "D is not a push peer"),
        ({"domain": "H", "entity": bob["id"]}, 400, "H is not a push peer"),
        ({"domain": "P1", "entity": "no-such-entity"}, 404, "never seen entity no-such-entity"),
        ({"domain": "P1", "entity": "P1:no-such-account"}, 404, "P1 has no ID no-such-account"),
        ({"domain": "P1"}, 400, '"entity" is required'),
        ({"domain": "P1", "entity": bob["id"], "wait": 3600}, 400, '"wait" is a number'),
    ]
    for body, expected, detail in cases:
        status, error = await admin(broker, "POST", "/admin/provision", body)
        assert status == expected, (body, error)
        assert detail in error["detail"], (body, error)
    code, out = await cli(broker_db(broker), "provision", "D", bob["id"])
    assert code == 1 and "D is not a push peer" in out

    # Out of P1's scope: the delivery finds it so, and creates nothing.
    await broker.app[POOL].execute(
        "UPDATE domains SET scope_filter = 'userName eq \"nobody\"' WHERE id = 'P1'"
    )
    # The change reaches the delivery worker by NOTIFY: a claim made before it comes in uses
    # the peers as they were (it flaked so under load: created, 201).
    claims = broker.app[DELIVERER].claims
    await until(
        lambda: all(p.scope_filter for p in claims._peers[1] if p.id == "P1"),
        "the worker to forget P1's settings",
    )
    status, error = await admin(
        broker, "POST", "/admin/provision", {"domain": "P1", "entity": bob["id"]}
    )
    assert status == 400 and "outside P1's scope" in error["detail"], error
    assert p1.call("GET", "/Users")[1]["totalResults"] == 0
    assert (
        await broker.app[POOL].fetchval("SELECT count(*) FROM id_mappings WHERE domain_id = 'P1'")
        == 0
    )
    # Without the admin scope, nothing.
    status, _ = await admin(
        broker, "POST", "/admin/provision", {"domain": "P1", "entity": bob["id"]}, token=""
    )
    assert status == 401
