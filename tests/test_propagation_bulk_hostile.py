"""SCIM Bulk toward a hostile or broken push peer: its BulkResponse is the peer's in every byte.
First the pure parts (``broker/propagation/bulk.py``), then ``PeerClient`` against a small
aiohttp peer that answers Bulk as told, then a real scim2-server behind a front that refuses
Bulk or loses its answers."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from broker.app import POOL
from broker.http import Answer
from broker.mapping.guard import LeakGuard
from broker.mapping.store import MappingStore
from broker.propagation.bulk import (
    BULK_RESPONSE,
    Operation,
    bulk_request,
    bulkable,
    is_bulk_response,
    operation_answers,
)
from broker.propagation.combining import BULK_REST
from broker.propagation.decisions import BULK_ROOM_PAYLOAD
from broker.propagation.peer import PeerClient
from broker.propagation.policy import Failure, Verdict
from broker.scim.guard import IdShape
from tests.propagation_support import (
    FAST,
    Gate,
    crowd,
    federation,
    gate,
    held,
    peer_id,
    tenant,
)
from tests.scim_support import Broker, Home, new_user

LIMIT = 1 << 20


def _op(method: str = "POST", path: str = "/Users", body: Any = None) -> Operation:
    return Operation(method, path, None if body is None else orjson.dumps(body))


def _one(result: dict[str, Any], operation: Operation | None = None) -> Answer | Failure | None:
    (answer,) = operation_answers({"Operations": [result]}, [operation or _op()])
    return answer


# ---------------------------------------------------------------------------- pure: bulkIds


@pytest.mark.parametrize(
    "bulk_id",
    ["\u00b2", "9" * 5000, "00", " 0", "0 ", "\u0660", "+0", "-0", "0x0", 0, None, ["0"]],
)
def test_a_bulk_id_is_an_operation_s_only_when_it_is_exactly_the_one_sent(bulk_id: Any) -> None:
    # "²".isdigit() and 5,000 digits once made int() raise out of the answer's reading (an
    # internal error on every retry); "00", "\u0660" (an Arabic-Indic zero) or "+0" named operation 0.
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
    )
    first, second, third = answers
    assert first is None and third is None
    assert isinstance(second, Answer) and second.body == {"id": "three"}


def test_an_answer_naming_another_method_is_not_the_operation_s() -> None:
    assert _one({"bulkId": "0", "method": "DELETE", "status": "204"}) is None
    assert _one({"bulkId": "0", "method": 7, "status": "201"}) is None
    answer = _one({"bulkId": "0", "method": "post", "status": "201", "response": {"id": "p"}})
    assert isinstance(answer, Answer) and answer.body == {"id": "p"}
    # Answered out of order without bulkIds: position says one thing, the method another.
    ops = [_op("PATCH", "/Users/a", {}), _op("DELETE", "/Users/b")]
    reversed_ = {"Operations": [{"method": "DELETE", "status": "204"}, {"method": "PATCH"}]}
    assert operation_answers(reversed_, ops) == [None, None]


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


# ---------------------------------------------------------------------------- the shell: a liar


@dataclass
class Liar:
    """A push peer whose ServiceProviderConfig says Bulk, answering each POST /Bulk as
    ``bulk`` says (a status, headers and raw body; None: never, until the test ends), and
    every other write as a SCIM service would. It records each request."""

    bulk: tuple[int, dict[str, str], bytes] | None
    payload: int = 1 << 20
    """The ``maxPayloadSize`` its configuration gives."""
    seen: list[tuple[str, str, Any]] = field(default_factory=list)
    url: str = ""
    never: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        path = "/" + request.match_info["tail"]
        self.seen.append((request.method, path, orjson.loads(raw) if raw else None))
        if path == "/ServiceProviderConfig":
            return web.json_response(
                {
                    "patch": {"supported": True},
                    "bulk": {
                        "supported": True,
                        "maxOperations": 100,
                        "maxPayloadSize": self.payload,
                    },
                }
            )
        if path == "/Bulk":
            if self.bulk is None:
                await self.never.wait()
                return web.Response(status=504)
            status, headers, body = self.bulk
            return web.Response(status=status, headers=headers, body=body)
        if request.method == "POST":
            made = {"id": "made-" + orjson.loads(raw)["userName"]}
            return web.json_response(made, status=201)
        return web.Response(status=204) if request.method == "DELETE" else web.json_response({})

    def sent(self) -> list[tuple[str, str]]:
        """What reached the peer, but its configuration."""
        return [(m, p) for m, p, _ in self.seen if p != "/ServiceProviderConfig"]


@asynccontextmanager
async def liar(
    bulk: tuple[int, dict[str, str], bytes] | None, *, limit: int = LIMIT, payload: int = 1 << 20
) -> AsyncIterator[tuple[Liar, PeerClient, list[float]]]:
    """A lying peer, and a client of it with one request slot and a clock the test moves."""
    peer = Liar(bulk, payload)
    app = web.Application()
    app.router.add_route("*", "/v2/{tail:.*}", peer.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    peer.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v2"
    clock = [1000.0]
    timeout = aiohttp.ClientTimeout(total=None, sock_read=0.5 if bulk is None else None)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            client = PeerClient(
                session,
                peer.url,
                "peer-secret",
                domain="P1",
                slots=asyncio.Semaphore(1),
                monotonic=lambda: clock[0],
                limit=limit,
            )
            yield peer, client, clock
    finally:
        peer.never.set()
        await runner.cleanup()


WRITES = [
    ("POST", "/Users", {"userName": "u0"}),
    ("PATCH", "/Users/a", {"Operations": [{"op": "replace", "path": "title", "value": "t"}]}),
    ("DELETE", "/Users/b", None),
    ("POST", "/Users", {"userName": "u3"}),
]


async def together(
    client: PeerClient, writes: list[tuple[str, str, Any]] = WRITES
) -> list[Answer | BaseException]:
    """The writes handed to the peer at once (as deliveries started together hand theirs)."""
    calls = [client.call(method, path, body=body) for method, path, body in writes]
    return list(await asyncio.gather(*calls, return_exceptions=True))


def _json(body: Any) -> tuple[dict[str, str], bytes]:
    return {"Content-Type": "application/scim+json"}, orjson.dumps(body)


@pytest.mark.parametrize("status", [400, 404, 405, 413, 501])
async def test_a_peer_refusing_bulk_gets_each_write_alone_once_in_order_then_no_bulk_a_while(
    status: int,
) -> None:
    async with liar((status, *_json({"detail": "no Bulk here"}))) as (peer, client, clock):
        assert not client.takes_bulk(), "its configuration is not read yet"
        answers = await together(client)
        assert [a.status if isinstance(a, Answer) else a for a in answers] == [201, 200, 204, 201]
        assert answers[0].body == {"id": "made-u0"}  # type: ignore[union-attr]
        assert answers[3].body == {"id": "made-u3"}  # type: ignore[union-attr]
        one_by_one = [(m, p) for m, p, _ in WRITES]
        assert peer.sent() == [("POST", "/Bulk"), *one_by_one], "each once, in order"
        assert not client.takes_bulk(), "its lane holds no more than without Bulk"
        peer.seen.clear()
        clock[0] += BULK_REST - 1
        await together(client)
        assert peer.sent() == one_by_one, "no Bulk while the peer rests from it"
        peer.seen.clear()
        clock[0] += 2
        await together(client)
        assert peer.sent()[0] == ("POST", "/Bulk"), "Bulk is tried again after the rest"
        assert not client.takes_bulk(), "refused again: resting again"


@pytest.mark.parametrize(("payload", "deeper"), [(BULK_ROOM_PAYLOAD, True), (4096, False)])
async def test_a_lane_holds_more_only_toward_a_peer_whose_bulk_requests_hold_many_writes(
    payload: int, deeper: bool
) -> None:
    deletes = [("DELETE", "/Users/a", None), ("DELETE", "/Users/b", None)]
    answered = {
        "schemas": [BULK_RESPONSE],
        "Operations": [
            {"bulkId": str(n), "method": "DELETE", "status": "204"} for n in range(len(deletes))
        ],
    }
    async with liar((200, *_json(answered)), payload=payload) as (peer, client, _clock):
        answers = await together(client, deletes)
        assert [a.status for a in answers if isinstance(a, Answer)] == [204, 204]
        assert peer.sent() == [("POST", "/Bulk")], "the two went together"
        assert client.takes_bulk() is deeper


@pytest.mark.parametrize(
    "answer",
    [
        (200, {"Content-Type": "text/html"}, b"<html>Welcome</html>"),
        (200, *_json({"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"]})),
        (200, *_json({"Operations": "all done"})),
        (201, *_json({"id": "one-account-for-all"})),
        (204, {}, b""),
    ],
)
async def test_an_answer_that_is_no_bulk_response_fails_each_write_for_its_retry_and_bulk_rests(
    answer: tuple[int, dict[str, str], bytes],
) -> None:
    # The peer may have made the writes: none is sent again now (a create's retry looks for
    # its correlation handle first), and none takes the whole answer for its own (a 201 with
    # one ID once mapped every create of the request to that account).
    async with liar(answer) as (peer, client, clock):
        answers = await together(client)
        for failure in answers:
            assert isinstance(failure, Failure), failure
            assert failure.verdict is Verdict.TRANSIENT
            assert "no Bulk" in failure.reason
        assert peer.sent() == [("POST", "/Bulk")]
        peer.seen.clear()
        clock[0] += 60
        await together(client)
        assert ("POST", "/Bulk") not in peer.sent(), "the retries go one by one"


@pytest.mark.parametrize(
    ("status", "headers", "verdict", "retry_after"),
    [
        (503, {}, Verdict.TRANSIENT, None),
        (500, {}, Verdict.TRANSIENT, None),
        (429, {"Retry-After": "7"}, Verdict.TRANSIENT, 7.0),
        (429, {}, Verdict.TRANSIENT, None),
        (401, {}, Verdict.PERMANENT, None),
        (409, {}, Verdict.PERMANENT, None),
    ],
)
async def test_a_whole_request_failure_is_each_write_s_failure_as_its_status_says(
    status: int, headers: dict[str, str], verdict: Verdict, retry_after: float | None
) -> None:
    # Never a write's own answer: a 409 to the whole request once sent each create to look
    # for a peer account to link to, and a 5xx reached a create as its "answer".
    body_headers, body = _json({"status": str(status), "detail": "busy"})
    async with liar((status, {**headers, **body_headers}, body)) as (peer, client, _):
        answers = await together(client)
        for failure in answers:
            assert isinstance(failure, Failure), failure
            assert (failure.verdict, failure.status) == (verdict, status)
            assert failure.retry_after == retry_after
        assert peer.sent() == [("POST", "/Bulk")], "nothing sent again now"
        peer.seen.clear()
        await together(client)
        assert peer.sent() == [("POST", "/Bulk")], "the peer still takes Bulk"


async def test_a_bulk_answer_that_never_comes_fails_each_write_for_its_retry() -> None:
    async with liar(None) as (peer, client, _):
        answers = await together(client)
        for failure in answers:
            assert isinstance(failure, Failure), failure
            assert failure.verdict is Verdict.TRANSIENT and "did not answer" in failure.reason
        assert peer.sent() == [("POST", "/Bulk")], "nothing sent again now"


async def test_a_bulk_answer_is_read_within_the_bound_of_every_peer_read() -> None:
    # Bounded as one request's answer is: a hostile peer's Bulk answer costs no more memory
    # than a single answer. The peer may have made the writes: each is retried by its own
    # rules, and alone, where a legitimately long answer (full resources) fits the bound.
    limit = 4096
    results = [
        {"bulkId": str(n), "status": "200", "response": {"pad": "x" * 3000}} for n in range(4)
    ]
    long = (200, *_json({"schemas": [BULK_RESPONSE], "Operations": results}))
    assert len(long[2]) > limit
    writes = [("PUT", f"/Users/u{n}", {"userName": f"u{n}"}) for n in range(4)]
    async with liar(long, limit=limit) as (peer, client, _):
        answers = await together(client, writes)
        for failure in answers:
            assert isinstance(failure, Failure) and failure.verdict is Verdict.TRANSIENT
            assert f"over {limit} bytes" in failure.reason
        peer.seen.clear()
        answers = await together(client, writes)
        assert ("POST", "/Bulk") not in peer.sent(), "Bulk rests; the retries go alone"
        assert all(isinstance(a, Answer) and a.status == 200 for a in answers), answers
    busy = (503, {"Retry-After": "3"}, b"x" * (2 * limit))
    async with liar(busy, limit=limit) as (peer, client, _):
        answers = await together(client, writes)
        for failure in answers:
            assert isinstance(failure, Failure) and failure.verdict is Verdict.TRANSIENT
            assert failure.retry_after == 3.0
        peer.seen.clear()
        await together(client, writes)
        assert peer.sent() == [("POST", "/Bulk")], "a busy peer still takes Bulk"


async def test_a_write_holding_a_bulk_id_reference_is_sent_alone() -> None:
    ok = (200, *_json({"Operations": []}))
    async with liar(ok) as (peer, client, _):
        writes = [
            ("PUT", "/Users/a", {"userName": "a"}),
            ("PUT", "/Users/b", {"userName": "b", "title": "bulkId:0"}),
            ("PUT", "/Users/c", {"userName": "c"}),
        ]
        await together(client, writes)
        alone = [(m, p) for m, p, _ in peer.seen if p.startswith("/Users")]
        assert alone == [("PUT", "/Users/b")]
        (bulk,) = [body for _, p, body in peer.seen if p == "/Bulk"]
        assert [op["path"] for op in bulk["Operations"]] == ["/Users/a", "/Users/c"]
        assert "bulkId:" not in orjson.dumps(bulk).decode()


async def test_the_leak_guard_reads_each_bulk_operation_as_sent_and_withholds_a_leaking_one(
    pool: asyncpg.Pool,
) -> None:
    store = MappingStore(pool)
    internal = uuid.uuid4().hex
    await store.register_entities({internal: "User"})
    ok = (200, *_json({"Operations": []}))
    async with liar(ok) as (peer, client, _):
        client.guard = LeakGuard(store, IdShape(r"[0-9a-f]{32}"))
        writes = [
            ("PUT", "/Users/a", {"userName": "a"}),
            ("PUT", f"/Users/{internal.upper()}", {"userName": "b"}),  # in the path
            ("PUT", "/Users/c", {"userName": "c", "title": f"x{internal}"}),  # in the body
            ("PUT", "/Users/d", {"userName": "d"}),
            # In the home's ID shape, but no internal ID: the peer's own, it goes.
            ("PUT", f"/Users/{uuid.uuid4().hex}", {"userName": "e"}),
        ]
        answers = await together(client, writes)
        for withheld in answers[1:3]:
            assert isinstance(withheld, Failure) and withheld.verdict is Verdict.PERMANENT
            assert withheld.reason.startswith("withheld") and internal not in withheld.reason
        (bulk,) = [body for _, p, body in peer.seen if p == "/Bulk"]
        paths = [op["path"] for op in bulk["Operations"]]
        assert paths == ["/Users/a", "/Users/d", writes[4][1]]
        assert internal not in orjson.dumps(peer.seen).decode().lower()


# ---------------------------------------------------------------------------- a real peer


async def each_created_once_and_mapped(broker: Broker, peer: Home, users: list[Any]) -> None:
    held_users = held(peer)["Users"]
    names = sorted(u["userName"] for u in held_users)
    assert names == sorted(u["userName"] for u in users), "each user created once"
    for user in users:
        mapped = await peer_id(broker, "P1", user["id"])
        (mine,) = [u for u in held_users if u["userName"] == user["userName"]]
        assert mapped == mine["id"]
    dead = await broker.app[POOL].fetchval("SELECT count(*) FROM outbox WHERE state = 'dead'")
    assert dead == 0


@asynccontextmanager
async def bulk_federation(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch, name: str
) -> AsyncIterator[tuple[Broker, Gate, Home]]:
    """A federation whose one peer P1 (the real peer's tenant ``name``) sits behind a gate,
    with Bulk on and two writes at once: the broker, the gate and the peer."""
    peer = tenant(peer_server, name)
    two = FAST.model_copy(update={"concurrency": 2, "bulk_operations": 32})
    async with gate(peer) as front:
        async for broker in federation(
            db_url, home, {"P1": front.url}, monkeypatch, peer_server.token, two
        ):
            yield broker, front, peer


async def test_a_real_peer_refusing_bulk_gets_each_create_once_alone(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with bulk_federation(db_url, home, peer_server, monkeypatch, "nobulk") as (
        broker,
        front,
        peer,
    ):
        front.refuse_bulk = 501
        users = await crowd(broker, front, [new_user() for _ in range(4)])
        assert front.refused, "Bulk was tried"
        assert len(front.refused) == 1, "and not again while the peer rests from it"
        assert len(front.refused[0]["Operations"]) >= 2
        creates = [p for m, p, _ in front.forwarded if m == "POST" and p == "/Users"]
        assert len(creates) == len(users), "each create sent alone, once"
        await each_created_once_and_mapped(broker, peer, users)


async def test_creates_whose_bulk_answer_was_lost_are_found_by_their_handle_not_made_twice(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The peer made the creates; the broker never heard. Each retry looks for its correlation
    # handle first (the create's pending row says it was tried), finds the account and maps it.
    async with bulk_federation(db_url, home, peer_server, monkeypatch, "lost") as (
        broker,
        front,
        peer,
    ):
        front.lose_bulk = 1
        users = await crowd(broker, front, [new_user() for _ in range(4)])
        assert front.lose_bulk == 0, "a Bulk answer was lost"
        bulks = [body for m, p, body in front.forwarded if p == "/Bulk"]
        lost = [op for op in bulks[0]["Operations"] if op["method"] == "POST"]
        assert len(lost) >= 2
        await each_created_once_and_mapped(broker, peer, users)
        home_ids = {u["id"] for u in users}
        for _, _, body in front.forwarded:
            text = json.dumps(body)
            assert not any(i in text for i in home_ids), "no internal ID reached the peer"


async def test_home_text_that_reads_as_a_bulk_id_reference_reaches_a_real_peer_as_text(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a Bulk request a peer reads "bulkId:0" as the ID of the account operation 0 created
    # (RFC 7644 section 3.7.2): such a write goes alone, and home's title arrives as text.
    async with bulk_federation(db_url, home, peer_server, monkeypatch, "refs") as (
        broker,
        front,
        peer,
    ):
        bodies = [new_user(title="bulkId:0") for _ in range(4)]
        users = await crowd(broker, front, bodies, together=False)
        await each_created_once_and_mapped(broker, peer, users)
        assert {u.get("title") for u in held(peer)["Users"]} == {"bulkId:0"}
        assert not [p for _, p, _ in front.forwarded if p == "/Bulk"]
