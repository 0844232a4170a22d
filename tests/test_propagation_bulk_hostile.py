"""SCIM Bulk toward a hostile or broken push peer: its BulkResponse is the peer's in every byte.
First the pure parts (``broker/propagation/bulk.py``), then ``PeerClient`` against a small
aiohttp peer that answers Bulk as told, then a real scim2-server behind a front that refuses
Bulk or loses its answers."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from broker.http import Answer
from broker.propagation.bulk import (
    BULK_RESPONSE,
    Operation,
    bulk_request,
    bulkable,
    is_bulk_response,
    operation_answers,
)
from broker.propagation.policy import Failure, Verdict

LIMIT = 1 << 20


def _op(method: str = "POST", path: str = "/Users", body: Any = None) -> Operation:
    return Operation(method, path, None if body is None else orjson.dumps(body))


def _one(result: dict[str, Any], operation: Operation | None = None) -> Answer | Failure | None:
    (answer,) = operation_answers({"Operations": [result]}, [operation or _op()], limit=LIMIT)
    return answer


# ---------------------------------------------------------------------------- pure: bulkIds


@pytest.mark.parametrize(
    "bulk_id",
    ["\u00b2", "9" * 5000, "00", " 0", "0 ", "\u0660", "+0", "-0", "0x0", 0, None, ["0"]],
)
def test_a_bulk_id_is_an_operation_s_only_when_it_is_exactly_the_one_sent(bulk_id: Any) -> None:
    # "²".isdigit() and 5,000 digits once made int() raise out of the answer's reading (an
    # internal error on every retry); "00", "\\u0660" (an Arabic-Indic zero) or "+0" named operation 0.
    result = {"status": "201", "location": "http://peer/v2/Users/p1"}
    if bulk_id is not None:
        result["bulkId"] = bulk_id
    assert _one(result) is None


def test_a_create_s_answer_without_its_bulk_id_is_no_answer_even_at_its_position() -> None:
    # RFC 7644 section 3.7: bulkId is required for a POST; read by position, a peer answering
    # out of order gives one create the account another made.
    ops = [_op(body={"userName": "a"}), _op(body={"userName": "b"})]
    answers = operation_answers(
        {
            "Operations": [
                {"status": "201", "location": "http://peer/v2/Users/made-for-b"},
                {"status": "201", "location": "http://peer/v2/Users/made-for-a"},
            ]
        },
        ops,
        limit=LIMIT,
    )
    assert answers == [None, None]


def test_an_operation_answered_twice_is_answered_by_neither() -> None:
    ops = [_op(), _op(), _op("DELETE", "/Users/x")]
    answers = operation_answers(
        {
            "Operations": [
                {"bulkId": "0", "status": "201", "location": "http://peer/v2/Users/one"},
                {"bulkId": "1", "status": "201", "location": "http://peer/v2/Users/three"},
                {"status": "204"},  # position 2, the DELETE: no bulkId needed
                {"bulkId": "0", "status": "201", "location": "http://peer/v2/Users/two"},
                {"bulkId": "2", "status": "404"},  # ...and then by bulkId: twice
                {"bulkId": "7", "status": "201"},  # unknown
            ]
        },
        ops,
        limit=LIMIT,
    )
    first, second, third = answers
    assert first is None and third is None
    assert isinstance(second, Answer) and second.body == {"id": "three"}


def test_an_answer_naming_another_method_is_not_the_operation_s() -> None:
    assert _one({"bulkId": "0", "method": "DELETE", "status": "204"}) is None
    assert _one({"bulkId": "0", "method": 7, "status": "201"}) is None
    answer = _one({"bulkId": "0", "method": "post", "status": "201", "response": {"id": "p"}})
    assert isinstance(answer, Answer) and answer.body == {"id": "p"}


# ---------------------------------------------------------------------------- pure: statuses


@pytest.mark.parametrize(
    "status",
    [True, 201.0, "2_01", "\uff12\uff10\uff11", " 201", "201 ", "1e2", "100", 100, 199, 600, "99"],
)
def test_a_status_is_three_ascii_digits_from_200_to_599(status: Any) -> None:
    patch = _op("PATCH", "/Users/a", {})
    assert _one({"bulkId": "0", "status": status}, patch) is None


@pytest.mark.parametrize("status", [200, "200", 599, "412"])
def test_a_status_in_range_is_read(status: Any) -> None:
    answer = _one({"bulkId": "0", "status": status}, _op("PATCH", "/Users/a", {}))
    assert isinstance(answer, Answer) and answer.status == int(status)


# ---------------------------------------------------------------------------- pure: locations


@pytest.mark.parametrize(
    "location",
    [
        "http://peer/v2/Groups/g1",  # another resource type
        "http://peer/v2/XUsers/u1",
        "http://peer/v2/Users/../Groups/g1",
        "http://peer/v2/Users/./u1",
        "http://peer/v2/Users/%2e%2e/Groups/g1",
        "http://peer/v2/Users/u1?attributes=id",
        "http://peer/v2/Users/u1#x",
        "http://peer/v2/Users/u1?",
        "Users/u1",  # relative, without the endpoint's segment
        "http://peer/v2/Users/",
        "http://peer/v2/Users",
        "",
        7,
    ],
)
def test_a_created_resource_s_location_outside_its_endpoint_gives_no_id(location: Any) -> None:
    answer = _one({"bulkId": "0", "status": "201", "location": location})
    assert isinstance(answer, Answer) and answer.status == 201
    assert answer.body is None, "the create fails as one whose answer has no id"


def test_a_location_of_another_origin_still_names_this_peer_s_resource() -> None:
    # A peer behind a proxy names its own address; the ID is only ever sent back to this peer.
    answer = _one({"bulkId": "0", "status": "201", "location": "https://elsewhere/scim/Users/u1"})
    assert isinstance(answer, Answer) and answer.body == {"id": "u1"}
    answer = _one({"bulkId": "0", "status": "201", "location": "/v2/Users/u%20%C3%A9"})
    assert isinstance(answer, Answer) and answer.body == {"id": "u \u00e9"}


def test_a_response_and_a_location_that_disagree_on_the_id_give_none() -> None:
    lying = {"bulkId": "0", "status": "201", "response": {"id": "u1"}}
    answer = _one({**lying, "location": "http://peer/v2/Users/u2"})
    assert isinstance(answer, Answer) and answer.body is None
    answer = _one({**lying, "location": "http://peer/v2/Groups/u1"})
    assert isinstance(answer, Answer) and answer.body is None
    answer = _one({**lying, "location": "http://peer/v2/Users/u1"})
    assert isinstance(answer, Answer) and answer.body == {"id": "u1"}


def test_an_operation_response_longer_than_its_own_request_s_answer_could_be_fails() -> None:
    huge = {"bulkId": "0", "status": "200", "response": {"id": "a", "pad": "x" * LIMIT}}
    failure = _one(huge, _op("PUT", "/Users/a", {}))
    assert isinstance(failure, Failure) and failure.verdict is Verdict.PERMANENT
    failure = _one({**huge, "status": "503"}, _op("PUT", "/Users/a", {}))
    assert isinstance(failure, Failure) and failure.verdict is Verdict.TRANSIENT
    fits = {"bulkId": "0", "status": "200", "response": {"id": "a", "pad": "x" * 1000}}
    assert isinstance(_one(fits, _op("PUT", "/Users/a", {})), Answer)


# ---------------------------------------------------------------------------- pure: the envelope


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "Operations",
        {"Operations": {"0": {}}},
        {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "Operations": []},
        {"schemas": BULK_RESPONSE, "Operations": []},
        {"id": "x"},
    ],
)
def test_what_is_not_a_bulk_response_is_told_apart(body: Any) -> None:
    assert not is_bulk_response(body)


def test_a_bulk_response_is_recognised_with_or_without_its_schemas() -> None:
    assert is_bulk_response({"schemas": [BULK_RESPONSE], "Operations": []})
    assert is_bulk_response({"Operations": [{"bulkId": "0", "status": "204"}]})


@pytest.mark.parametrize("text", ["bulkId:0", "BULKID:1", "see bulkid:qwerty"])
def test_a_write_holding_a_bulk_id_reference_never_travels_in_bulk(text: str) -> None:
    # A peer reads "bulkId:..." in a Bulk operation as another operation's created resource
    # (RFC 7644 section 3.7.2): home's text would reach it as another account's ID.
    assert not bulkable(_op(body={"userName": "a", "title": text}))
    assert not bulkable(_op("DELETE", f"/Users/{text}"))
    assert bulkable(_op(body={"userName": "a", "title": "bulk Id: 0"}))


def test_the_envelope_adds_nothing_but_operation_numbers() -> None:
    # What the broker sends in a Bulk request is each write as the leak guard checked it, and
    # its position: nothing else of home's (an internal ID in a bulkId or a path would show).
    ops = [_op(body={"userName": f"u{n}"}) for n in range(12)] + [_op("DELETE", "/Users/p")]
    sent = orjson.loads(bulk_request(ops))
    assert set(sent) == {"schemas", "Operations"}
    for n, (operation, carried) in enumerate(zip(ops, sent["Operations"], strict=True)):
        assert carried.pop("bulkId") == str(n)
        assert carried == {
            "method": operation.method,
            "path": operation.path,
            **({} if operation.data is None else {"data": orjson.loads(operation.data)}),
        }
