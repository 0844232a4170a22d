"""SCIM Bulk toward a push peer (RFC 7644 section 3.7): writes waiting for the peer's request
slots travel together, each with its own operation's answer; the pure parts of
``broker/propagation/bulk.py``; a real scim2-server peer (it says ``bulk.supported``)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from broker.app import DELIVERER, POOL
from broker.propagation.bulk import (
    BULK_REQUEST,
    NO_BULK,
    BulkFeatures,
    Operation,
    bulk_features,
    bulk_request,
    operation_answers,
    take,
)
from tests.propagation_support import (
    FAST,
    crowd,
    federation,
    gate,
    held,
    peer_id,
    tenant,
)
from tests.scim_support import Home, new_user

CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"


def _op(method: str = "POST", path: str = "/Users", body: Any = None) -> Operation:
    return Operation(method, path, None if body is None else orjson.dumps(body))


def test_a_peer_takes_bulk_only_when_its_configuration_says_so_within_the_broker_s_ceiling() -> (
    None
):
    config = {"bulk": {"supported": True, "maxOperations": 1000, "maxPayloadSize": 1 << 20}}
    assert bulk_features(config, ceiling=32) == BulkFeatures(32, 1 << 20)
    assert bulk_features(config, ceiling=0) == NO_BULK
    assert not bulk_features(config, ceiling=1).usable
    assert bulk_features({"bulk": {"supported": False}}, ceiling=32) == NO_BULK
    assert bulk_features({"bulk": {"supported": "yes", "maxOperations": 9}}, ceiling=32) == NO_BULK
    assert bulk_features({}, ceiling=32) == NO_BULK
    assert bulk_features(None, ceiling=32) == NO_BULK


def test_a_bulk_request_stops_at_the_peer_s_operations_and_payload_limits() -> None:
    ops = [_op(body={"userName": f"u{n}", "pad": "x" * 100}) for n in range(10)]
    assert take(ops, BulkFeatures(4, 1 << 20)) == 4
    assert take(ops[:3], BulkFeatures(4, 1 << 20)) == 3
    assert take(ops, BulkFeatures(10, 700)) == 3  # about 200 bytes an operation
    assert take(ops, BulkFeatures(10, 10)) == 1, "one too large for any request goes alone"


def test_a_bulk_request_carries_each_write_as_it_was_with_an_operation_number() -> None:
    body = {"schemas": [CORE_USER], "userName": "dave_%", "externalId": "h\u00e9"}
    ops = [_op(body=body), _op("DELETE", "/Users/abc"), _op("PATCH", "/Users/x%2Fy", {"a": 1})]
    sent = orjson.loads(bulk_request(ops))
    assert sent == {
        "schemas": [BULK_REQUEST],
        "Operations": [
            {"method": "POST", "path": "/Users", "bulkId": "0", "data": body},
            {"method": "DELETE", "path": "/Users/abc", "bulkId": "1"},
            {"method": "PATCH", "path": "/Users/x%2Fy", "bulkId": "2", "data": {"a": 1}},
        ],
    }


def test_each_operation_gets_its_own_answer_by_bulk_id_or_position() -> None:
    ops = [_op(), _op(), _op("PATCH", "/Users/a", {}), _op("DELETE", "/Users/b"), _op()]
    error = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "status": "409"}
    answers = operation_answers(
        {
            "Operations": [
                # Out of order: found by bulkId.
                {"bulkId": "1", "method": "POST", "status": "409", "response": error},
                {
                    "bulkId": "0",
                    "method": "POST",
                    "status": "201",
                    "version": 'W/"1"',
                    "location": "http://peer/v2/Users/p%20eer-1",
                },
                {"method": "PATCH", "status": 200, "location": "http://peer/v2/Users/a"},
                # No bulkId: found at its position. A bulkId beyond those sent: ignored.
                {"method": "DELETE", "status": "204"},
                {"bulkId": "7", "status": "204"},
            ]
        },
        ops,
    )
    first, second, third, fourth, fifth = answers
    assert first is not None and (first.status, first.body) == (201, {"id": "p eer-1"})
    assert first.headers["ETag"] == 'W/"1"'
    assert second is not None and (second.status, second.body) == (409, error)
    assert third is not None and third.status == 200 and third.body is None
    assert fourth is not None and fourth.status == 204
    assert fifth is None, "the peer said nothing of it"
    # A location whose last segment would name another path gives no ID (the create fails).
    for location in ("http://peer/v2/Users/a%2F..%2Fb", "http://peer/v2/Users/..", "/%3F"):
        (created,) = operation_answers(
            {"Operations": [{"bulkId": "0", "status": "201", "location": location}]},
            [_op()],
        )
        assert created is not None and (created.status, created.body) == (201, None)
    patch = [_op("PATCH", "/Users/a", {})]
    assert operation_answers({"Operations": [{"status": "ok"}]}, patch) == [None]
    assert operation_answers({"Operations": [{"status": "999"}]}, patch) == [None]
    assert operation_answers("not a bulk response", ops) == [None] * 5


async def test_writes_waiting_for_a_peer_travel_together_in_one_bulk_request(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = tenant(peer_server, "bulk")
    taken = new_user()
    status, _ = peer.call("POST", "/Users", taken)  # the peer's own account holds this userName
    assert status == 201
    two = FAST.model_copy(update={"concurrency": 2, "bulk_operations": 32})
    async with gate(peer) as front:
        async for broker in federation(
            db_url, home, {"P1": front.url}, monkeypatch, peer_server.token, two
        ):
            # Four creates and one the peer refuses (its own account holds the userName), held
            # at the peer until they are about to go together (concurrency 2).
            created = await crowd(broker, front, [*(new_user() for _ in range(4)), dict(taken)])
            users, clash = created[:4], created[4]

            bulks = [body for method, path, body in front.forwarded if path == "/Bulk"]
            assert any(len(b["Operations"]) >= 2 for b in bulks), front.forwarded
            # The peer takes Bulk: its lane now holds BULK_DEPTH rounds under way.
            assert broker.app[DELIVERER].claims.takes_bulk("P1")
            assert not broker.app[DELIVERER].claims.takes_bulk("D"), "never called"
            operations = [op for b in bulks for op in b["Operations"]]
            assert all(op["method"] == "POST" and op["path"] == "/Users" for op in operations)
            home_ids = {u["id"] for u in [*users, clash]}
            for body in bulks:
                text = json.dumps(body)
                assert not any(i in text for i in home_ids), "no internal ID in a Bulk request"
            # Each write got its own answer: the four created, once each, and mapped to the IDs
            # the peer gave them; the one whose userName the peer's own account holds refused.
            names = sorted(u["userName"] for u in held(peer)["Users"])
            assert names == sorted([taken["userName"], *(u["userName"] for u in users)])
            for user in users:
                mapped = await peer_id(broker, "P1", user["id"])
                mine = [u for u in held(peer)["Users"] if u["userName"] == user["userName"]]
                assert mapped is not None and mapped == mine[0]["id"]
            assert await peer_id(broker, "P1", clash["id"]) is None
            dead = await broker.app[POOL].fetchrow(
                "SELECT state, last_error FROM outbox WHERE internal_id = $1", clash["id"]
            )
            assert dead["state"] == "dead" and dead["last_error"]["status"] == 409
