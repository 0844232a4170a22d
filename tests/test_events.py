"""Change notification end to end: a real home, the broker, SETs polled (RFC 8936) and pushed
(RFC 8935), verified as a domain would verify them (joserfc against the published JWKS)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet

from broker.app import DB_URL, KEYS, WAITERS
from broker.config import DEFAULT_ID_PATTERN, EventsConfig
from broker.domains import DomainStore
from broker.tokens import TokenStore
from tests.propagation_support import (
    FAST,
    admin,
    admin_metrics,
    cli,
    federation,
    home_tool,
    patch,
    quiesce,
)
from tests.scim_support import (
    CORE_GROUP,
    HOME_ID,
    Broker,
    Home,
    _free_port,
    new_user,
    start_broker,
    unique,
)
from tests.waiting import until

PROV = "urn:ietf:params:scim:event:prov:"
EVENTS = EventsConfig(long_poll_max=3.0, key_refresh=0.05)


@pytest.fixture
async def broker(db_url: str, home: Home, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Broker]:
    async for started in federation(db_url, home, {}, monkeypatch, home.token, FAST, EVENTS):
        await add_domain(started, "E")
        yield started


@asynccontextmanager
async def served(
    method: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> AsyncIterator[str]:
    """A domain-side HTTP endpoint (a SET receiver, a JWKS) for as long as the context lasts;
    its URL."""
    app = web.Application()
    app.router.add_route(method, "/events", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/events"
    finally:
        await runner.cleanup()


async def add_domain(broker: Broker, name: str, **options: Any) -> None:
    await DomainStore(broker.pool).add(name, **options)
    broker.tokens[name], _ = await TokenStore(broker.pool).issue(name)


async def subscribe(broker: Broker, domain: str, *options: str) -> None:
    code, out = await cli(broker_db(broker), "events", "subscribe", domain, *options)
    assert code == 0, out


def broker_db(broker: Broker) -> str:
    return broker.app[DB_URL]


async def poll(broker: Broker, domain: str, **body: Any) -> tuple[int, dict[str, Any]]:
    response = await broker.client.post(
        "/events/poll",
        data=json.dumps(body),
        headers={"Authorization": f"Bearer {broker.tokens[domain]}"},
    )
    return response.status, await response.json()


async def jwks(broker: Broker) -> KeySet:
    response = await broker.client.get("/.well-known/jwks.json")
    assert response.status == 200
    return KeySet.import_key_set(json.loads(await response.text()))


async def verified(broker: Broker, domain: str, sets: dict[str, str]) -> list[dict[str, Any]]:
    """Each SET checked as the domain would: signature against the JWKS, audience, jti, typ."""
    keys = await jwks(broker)
    out = []
    for jti, token in sets.items():
        decoded = jwt.decode(token, keys)
        assert decoded.header["typ"] == "secevent+jwt"
        claims = decoded.claims
        assert claims["jti"] == jti
        assert claims["aud"] in (domain, [domain])
        assert claims["iss"] == broker.base.removesuffix("/scim/v2")
        assert claims["sub_id"]["format"] == "scim"
        assert not HOME_ID.search(json.dumps(claims)), f"an internal ID in a SET: {claims}"
        out.append(claims)
    return sorted(out, key=lambda c: c["iat"])


async def seen_id(broker: Broker, domain: str, user_name: str) -> str:
    """The ID ``domain`` knows a user by, read through the broker."""
    status, body, _ = await broker.call(domain, "GET", f'/Users?filter=userName eq "{user_name}"')
    assert status == 200 and body["totalResults"] == 1, body
    return str(body["Resources"][0]["id"])


def kinds(claims: dict[str, Any]) -> set[str]:
    return {uri.removeprefix(PROV) for uri in claims["events"]}


async def test_polled_sets_verify_and_name_each_domain_by_its_own_ids(broker: Broker) -> None:
    await subscribe(broker, "D", "--delivery", "poll")
    await subscribe(broker, "E", "--delivery", "poll")
    name = unique("ev")
    status, created = await home_tool(broker, "POST", "/Users", new_user(name, title="Eng"))
    assert status == 201
    status, _ = await home_tool(
        broker,
        "PATCH",
        f"/Users/{created['id']}",
        patch({"op": "replace", "path": "title", "value": "Lead"}),
    )
    assert status in (200, 204)

    status, got_d = await poll(broker, "D", returnImmediately=True)
    assert status == 200, got_d
    status, got_e = await poll(broker, "E", returnImmediately=True)
    assert status == 200, got_e
    d_sets, e_sets = (
        await verified(broker, "D", got_d["sets"]),
        await verified(broker, "E", got_e["sets"]),
    )
    assert [kinds(c) for c in d_sets] == [{"create:notice"}, {"patch:notice"}]
    assert d_sets[1]["events"][PROV + "patch:notice"]["attributes"] == ["title"]

    d_id, e_id = await seen_id(broker, "D", name), await seen_id(broker, "E", name)
    assert d_id != e_id and created["id"] not in (d_id, e_id)
    assert [c["sub_id"]["uri"] for c in d_sets] == [f"/Users/{d_id}"] * 2
    assert [c["sub_id"]["uri"] for c in e_sets] == [f"/Users/{e_id}"] * 2
    # Each domain has its own txn for a change (colluding domains cannot pair their SETs by it);
    # another change, another txn.
    assert not {c["txn"] for c in d_sets} & {c["txn"] for c in e_sets}
    assert d_sets[0]["txn"] != d_sets[1]["txn"]
    assert not set(got_d["sets"]) & set(got_e["sets"])

    # Unacknowledged SETs come again; acknowledged ones never do.
    _, again = await poll(broker, "D", returnImmediately=True)
    assert again["sets"] == got_d["sets"]
    first = min(got_d["sets"], key=lambda j: d_sets[0]["jti"] != j)
    _, after_ack = await poll(broker, "D", ack=[first], returnImmediately=True)
    assert set(after_ack["sets"]) == set(got_d["sets"]) - {first}
    metrics = await admin_metrics(broker)
    assert 'broker_security_events{domain="D",state="sent"} 1.0' in metrics
    _, empty = await poll(broker, "D", ack=list(after_ack["sets"]), returnImmediately=True)
    assert empty == {"sets": {}, "moreAvailable": False}


async def test_a_domain_hears_only_of_what_it_subscribed_to_and_may_read(broker: Broker) -> None:
    await subscribe(broker, "D", "--delivery", "poll", "--attributes", "title")
    await subscribe(broker, "E", "--delivery", "poll", "--resource-types", "Group")
    status, created = await home_tool(broker, "POST", "/Users", new_user(unique("ev")))
    assert status == 201
    for op in (
        {"op": "replace", "path": "displayName", "value": "Not of interest"},
        {"op": "replace", "path": "title", "value": "Of interest"},
    ):
        status, _ = await home_tool(broker, "PATCH", f"/Users/{created['id']}", patch(op))
        assert status in (200, 204)
    _, got = await poll(broker, "D", returnImmediately=True)
    claims = await verified(broker, "D", got["sets"])
    assert [kinds(c) for c in claims] == [{"create:notice"}, {"patch:notice"}]
    assert claims[1]["events"][PROV + "patch:notice"]["attributes"] == ["title"]
    _, nothing = await poll(broker, "E", returnImmediately=True)
    assert nothing["sets"] == {}


async def test_full_sets_carry_values_in_the_domains_terms_within_its_read_list(
    db_url: str, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    async for broker in federation(db_url, home, {}, monkeypatch, home.token, FAST, EVENTS):
        await add_domain(broker, "R", read_attributes=["displayName", "members", "userName"])
        await subscribe(broker, "R", "--delivery", "poll", "--detail", "full")
        name = unique("ev")
        _, user = await home_tool(broker, "POST", "/Users", new_user(name, title="Secret"))
        await home_tool(
            broker,
            "POST",
            "/Groups",
            {
                "schemas": [CORE_GROUP],
                "displayName": unique("g"),
                "members": [{"value": user["id"], "type": "User"}],
            },
        )
        _, got = await poll(broker, "R", returnImmediately=True)
        claims = await verified(broker, "R", got["sets"])
        creates = [c for c in claims if PROV + "create:full" in c["events"]]
        assert len(creates) == 2
        user_data = next(c for c in creates if "/Users/" in c["sub_id"]["uri"])["events"][
            PROV + "create:full"
        ]["data"]
        group_data = next(c for c in creates if "/Groups/" in c["sub_id"]["uri"])["events"][
            PROV + "create:full"
        ]["data"]
        r_user = await seen_id(broker, "R", name)
        assert user_data["userName"] == name
        assert "title" not in user_data, "the read list leaves title out"
        assert [m["value"] for m in group_data["members"]] == [r_user]


async def test_a_push_receiver_that_fails_then_recovers_gets_everything_once_in_order(
    db_url: str, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[dict[str, Any]] = []
    refusals = {"left": 4}
    keys: list[KeySet] = []

    async def receive(request: web.Request) -> web.Response:
        assert request.content_type == "application/secevent+jwt"
        assert request.headers["Authorization"] == "Bearer receiver-secret"
        if refusals["left"]:
            refusals["left"] -= 1
            return web.Response(status=503)
        token = (await request.text()).strip()
        received.append(jwt.decode(token, keys[0]).claims)
        return web.Response(status=202)

    monkeypatch.setenv("RECEIVER_TOKEN", "receiver-secret")
    async with served("POST", receive) as endpoint:
        async for broker in federation(db_url, home, {}, monkeypatch, home.token, FAST, EVENTS):
            keys.append(await jwks(broker))
            await subscribe(
                broker,
                "D",
                "--delivery",
                "push",
                "--endpoint",
                endpoint,
                "--token-env",
                "RECEIVER_TOKEN",
            )
            users = []
            for _ in range(3):
                _, user = await home_tool(broker, "POST", "/Users", new_user(unique("ev")))
                users.append(user["id"])
            for n in range(2):
                for user_id in users:
                    status, _ = await home_tool(
                        broker,
                        "PATCH",
                        f"/Users/{user_id}",
                        patch({"op": "replace", "path": "title", "value": f"t{n}"}),
                    )
                    assert status in (200, 204)
            await quiesce(broker)
    assert refusals["left"] == 0
    jtis = [c["jti"] for c in received]
    assert len(jtis) == len(set(jtis)) == 9, "every SET once"
    by_subject: dict[str, list[str]] = {}
    for claims in received:
        by_subject.setdefault(claims["sub_id"]["uri"], []).extend(kinds(claims))
    assert sorted(by_subject.values()) == [["create:notice", "patch:notice", "patch:notice"]] * 3
    assert not HOME_ID.search(json.dumps(received))


async def test_a_long_poll_returns_when_an_event_arrives_and_at_the_bound_when_none(
    broker: Broker,
) -> None:
    await subscribe(broker, "D", "--delivery", "poll")
    started = time.monotonic()
    status, empty = await poll(broker, "D")
    waited = time.monotonic() - started
    assert status == 200 and empty["sets"] == {}
    assert waited >= EVENTS.long_poll_max * 0.9, "an empty long poll waits for the bound"

    async def change_soon() -> None:
        # Once the poll waits for D's next SET (it registered to be woken), the change comes.
        await until(lambda: "D" in broker.app[WAITERS]._waiting, "the poll waiting")
        await home_tool(broker, "POST", "/Users", new_user(unique("ev")))

    writer = asyncio.create_task(change_soon())
    started = time.monotonic()
    status, got = await poll(broker, "D")
    waited = time.monotonic() - started
    await writer
    assert status == 200 and len(got["sets"]) == 1
    assert waited < EVENTS.long_poll_max * 0.9, "the poll answered when the event came"


async def _signs_with(broker: Broker, kid: str) -> bool:
    return (await broker.app[KEYS].current()).kid == kid


async def test_sets_signed_before_and_after_a_key_rotation_verify(broker: Broker) -> None:
    await subscribe(broker, "D", "--delivery", "poll")
    await home_tool(broker, "POST", "/Users", new_user(unique("ev")))
    _, before = await poll(broker, "D", returnImmediately=True)
    code, out = await cli(broker_db(broker), "keys", "rotate")
    assert code == 0, out
    new_kid = out.strip().splitlines()[-1]
    await until(  # the broker looks for a new signing key every key_refresh seconds
        lambda: _signs_with(broker, new_kid), "the broker signing with the rotated key"
    )
    await home_tool(broker, "POST", "/Users", new_user(unique("ev")))
    _, both = await poll(broker, "D", returnImmediately=True)
    assert set(before["sets"]) < set(both["sets"])
    claims = await verified(broker, "D", both["sets"])  # old and new key both published
    assert len(claims) == 2
    headers = {jwt.decode(t, await jwks(broker)).header["kid"] for t in both["sets"].values()}
    assert len(headers) == 2 and new_kid in headers
    # Once the old key's SETs are acknowledged, only the signing key is published.
    await poll(broker, "D", ack=list(both["sets"]), returnImmediately=True)
    published = (await jwks(broker)).keys
    assert [k.kid for k in published] == [new_kid]


async def test_poll_errors_say_what_to_fix(broker: Broker) -> None:
    status, body = await poll(broker, "E", returnImmediately=True)
    assert status == 400 and body["err"] == "invalid_request"
    assert "broker events subscribe E" in body["description"]
    await subscribe(broker, "E", "--delivery", "poll")
    for bad in ({"maxEvents": -1}, {"ack": "jti"}, {"returnImmediately": "yes"}):
        status, body = await poll(broker, "E", **bad)
        assert status == 400 and body["err"] == "invalid_request", (bad, body)
    response = await broker.client.post("/events/poll", data="{}")
    assert response.status == 401


async def test_the_service_provider_config_advertises_events_to_subscribers(
    broker: Broker,
) -> None:
    status, config, _ = await broker.call("D", "GET", "/ServiceProviderConfig")
    assert status == 200 and "securityEvents" not in config
    await subscribe(broker, "D", "--delivery", "poll")
    status, config, _ = await broker.call("D", "GET", "/ServiceProviderConfig")
    assert status == 200
    advertised = config["securityEvents"]
    assert PROV + "create:notice" in advertised["eventUris"]
    assert PROV + "delete" in advertised["eventUris"]


# --------------------------------------------------------------------------- home as a source


@pytest.fixture
async def home_issuer() -> AsyncIterator[tuple[ECKey, str]]:
    """The home's SET signing key and its JWKS URL (the home SCIM server emits no SETs: this
    stands in for the home's event transmitter only)."""
    key = ECKey.generate_key("P-256", parameters={"kid": "home-1"})

    async def serve(_request: web.Request) -> web.Response:
        return web.json_response({"keys": [key.as_dict(private=False)]})

    async with served("GET", serve) as url:
        yield key, url


async def push_home_set(broker: Broker, token: str, content_type: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{broker.admin_url}/home/events",
            data=token,
            headers={"Authorization": f"Bearer {broker.tokens['H']}", "Content-Type": content_type},
        ) as response,
    ):
        text = await response.text()
        return response.status, json.loads(text) if text else None


async def test_sets_pushed_by_the_home_become_the_domains_sets(
    db_url: str,
    home: Home,
    monkeypatch: pytest.MonkeyPatch,
    home_issuer: tuple[ECKey, str],
) -> None:
    key, jwks_url = home_issuer
    events = EVENTS.model_copy(update={"home_jwks_url": jwks_url, "home_issuer": "https://home"})
    async for broker in federation(db_url, home, {}, monkeypatch, home.token, FAST, events):
        await subscribe(broker, "D", "--delivery", "poll")
        name = unique("ev")
        status, user = home.call("POST", "/Users", new_user(name))  # directly in home
        assert status == 201

        def signed(issuer: str, signer: ECKey = key, user_id: str = user["id"]) -> str:
            claims = {
                "iss": issuer,
                "jti": unique("jti"),
                "iat": int(time.time()),
                "sub_id": {"format": "scim", "uri": f"/Users/{user_id}"},
                "events": {PROV + "create:notice": {"attributes": ["userName"]}},
            }
            header = {"alg": "ES256", "typ": "secevent+jwt", "kid": signer.kid}
            return jwt.encode(header, claims, signer)

        status, body = await push_home_set(broker, signed("https://home"), "text/plain")
        assert status == 400 and body["err"] == "invalid_request"
        status, body = await push_home_set(
            broker, signed("https://elsewhere"), "application/secevent+jwt"
        )
        assert status == 400 and body["err"] == "invalid_issuer"
        stranger = ECKey.generate_key("P-256", parameters={"kid": "home-1"})
        status, body = await push_home_set(
            broker, signed("https://home", stranger), "application/secevent+jwt"
        )
        assert status == 400, body
        _, nothing = await poll(broker, "D", returnImmediately=True)
        assert nothing["sets"] == {}, "a refused SET changes nothing"

        status, _ = await push_home_set(broker, signed("https://home"), "application/secevent+jwt")
        assert status == 202
        _, got = await poll(broker, "D", returnImmediately=True)
        (claims,) = await verified(broker, "D", got["sets"])
        assert kinds(claims) == {"create:notice"}
        assert claims["sub_id"]["uri"] == f"/Users/{await seen_id(broker, 'D', name)}"


async def test_merge_and_split_notices_reach_only_the_domains_that_asked(
    broker: Broker, home: Home
) -> None:
    await subscribe(broker, "D", "--delivery", "poll", "--identity-events")
    await subscribe(broker, "E", "--delivery", "poll")
    names = [unique("ev"), unique("ev")]
    users = [(await home_tool(broker, "POST", "/Users", new_user(n)))[1]["id"] for n in names]
    survivor, loser = [await seen_id(broker, "D", n) for n in names]
    e_ids = {await seen_id(broker, "E", n) for n in names}
    for domain in ("D", "E"):  # the creates, acknowledged
        _, got = await poll(broker, domain, returnImmediately=True)
        await poll(broker, domain, ack=list(got["sets"]), returnImmediately=True)

    status, _ = await admin(
        broker,
        "POST",
        "/admin/merges",
        {"survivor": users[0], "losers": [users[1]], "idempotency_key": unique("k")},
    )
    assert status == 202
    _, got = await poll(broker, "D", returnImmediately=True)
    (merged,) = await verified(broker, "D", got["sets"])
    assert merged["sub_id"]["uri"] == f"/Users/{loser}"
    assert merged["events"] == {"urn:scim-id-broker:event:merge": {"primary": f"/Users/{survivor}"}}
    _, nothing = await poll(broker, "E", returnImmediately=True)
    assert nothing["sets"] == {}, "E did not ask for merge notices"

    # Undone: the alias moves to a new entity made in home for it.
    status, split_off = home.call("POST", "/Users", new_user(unique("ev")))
    assert status == 201
    status, _ = await admin(
        broker,
        "POST",
        "/admin/splits",
        {
            "source": users[0],
            "new": [split_off["id"]],
            "move": {"D": [loser]},
            "idempotency_key": unique("k"),
        },
    )
    assert status == 202
    _, got = await poll(broker, "D", ack=[merged["jti"]], returnImmediately=True)
    (split,) = await verified(broker, "D", got["sets"])
    assert split["sub_id"]["uri"] == f"/Users/{loser}"
    assert split["events"] == {
        "urn:scim-id-broker:event:split": {
            "primary": f"/Users/{loser}",
            "splitFrom": f"/Users/{survivor}",
        }
    }
    assert not e_ids & {loser, survivor}


async def test_out_of_scope_entities_make_no_sets_and_deletes_reach_who_knew(
    broker: Broker,
) -> None:
    await add_domain(broker, "S", scope_filter='title eq "In"')
    await subscribe(broker, "S", "--delivery", "poll")
    await subscribe(broker, "D", "--delivery", "poll")
    _, outside = await home_tool(broker, "POST", "/Users", new_user(unique("ev"), title="Out"))
    inside_name = unique("ev")
    _, inside = await home_tool(broker, "POST", "/Users", new_user(inside_name, title="In"))
    _, got = await poll(broker, "S", returnImmediately=True)
    (created,) = await verified(broker, "S", got["sets"])
    assert created["sub_id"]["uri"] == f"/Users/{await seen_id(broker, 'S', inside_name)}"

    _, got = await poll(broker, "D", returnImmediately=True)
    await poll(broker, "D", ack=list(got["sets"]), returnImmediately=True)
    for user in (outside, inside):
        status, _ = await home_tool(broker, "DELETE", f"/Users/{user['id']}")
        assert status == 204
    _, got = await poll(broker, "S", ack=[created["jti"]], returnImmediately=True)
    (deleted,) = await verified(broker, "S", got["sets"])
    assert kinds(deleted) == {"delete"} and deleted["sub_id"] == created["sub_id"]
    _, got = await poll(broker, "D", returnImmediately=True)
    assert [kinds(c) for c in await verified(broker, "D", got["sets"])] == [{"delete"}] * 2


async def test_a_set_about_hex_a_domain_wrote_into_a_title_is_delivered(broker: Broker) -> None:
    """Class 6 of issue 14: the shape rule withheld (for good) every SET of a user whose title a
    domain had set to 32 hex digits; only real internal IDs are withheld now."""
    await subscribe(broker, "D", "--delivery", "poll", "--detail", "full")
    written = f"badge {uuid.uuid4().hex}, emp-{uuid.uuid4().hex.upper()}"
    status, created, _ = await broker.call("E", "POST", "/Users", new_user(title=written))
    assert status == 201, created
    _, got = await poll(broker, "D", returnImmediately=True)
    # Decoded here rather than by verified(), whose check is by shape.
    (token,) = got["sets"].values()
    claims = jwt.decode(token, await jwks(broker)).claims
    assert claims["events"][PROV + "create:full"]["data"]["title"] == written
    assert created["id"] not in json.dumps(claims), "pairwise: E's ID is not D's"


async def test_sets_are_delivered_with_the_readme_default_id_pattern(
    db_url: str, home: Home
) -> None:
    """The default id_pattern (UUIDs, dashed or not) matches the broker's own jti and txn: the
    shape rule withheld every SET. The broker's identifiers are never internal IDs."""
    domains: dict[str, dict[str, Any]] = {"H": {"kind": "home"}, "D": {}}
    async for broker in start_broker(
        db_url, home, domains, propagation=FAST, events=EVENTS, id_pattern=DEFAULT_ID_PATTERN
    ):
        await subscribe(broker, "D", "--delivery", "poll")
        status, _ = await home_tool(broker, "POST", "/Users", new_user(unique("ev")))
        assert status == 201
        _, got = await poll(broker, "D", returnImmediately=True)
        (claims,) = await verified(broker, "D", got["sets"])
        assert kinds(claims) == {"create:notice"}
        assert (
            await broker.pool.fetchval(
                "SELECT count(*) FROM security_events WHERE state = 'failed'"
            )
            == 0
        )


async def test_a_set_that_would_carry_an_internal_id_is_never_sent(
    db_url: str, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    async for broker in federation(db_url, home, {}, monkeypatch, home.token, FAST, EVENTS):
        await subscribe(broker, "D", "--delivery", "poll", "--detail", "full")
        _, other = await home_tool(broker, "POST", "/Users", new_user(unique("ev")))
        _, got = await poll(broker, "D", returnImmediately=True)
        await poll(broker, "D", ack=list(got["sets"]), returnImmediately=True)
        # Home's free text names another user by its internal ID: the rewriter cannot know.
        _, planted = await home_tool(
            broker, "POST", "/Users", new_user(unique("ev"), title=f"reports to {other['id']}")
        )
        _, got = await poll(broker, "D", returnImmediately=True)
        assert got["sets"] == {}
        assert other["id"] not in json.dumps(got)
        state = await broker.pool.fetchval(
            "SELECT state FROM security_events WHERE internal_id = $1", planted["id"]
        )
        assert state == "failed"


async def test_deactivation_set_errors_and_more_available(broker: Broker) -> None:
    await subscribe(broker, "D", "--delivery", "poll")
    _, user = await home_tool(broker, "POST", "/Users", new_user(unique("ev"), active=True))
    status, _ = await home_tool(
        broker,
        "PATCH",
        f"/Users/{user['id']}",
        patch({"op": "replace", "path": "active", "value": False}),
    )
    assert status in (200, 204)
    _, first = await poll(broker, "D", maxEvents=1, returnImmediately=True)
    assert len(first["sets"]) == 1 and first["moreAvailable"] is True
    (created,) = await verified(broker, "D", first["sets"])
    assert kinds(created) == {"create:notice"}
    # The domain reports it could not use the create: that SET is settled with its error.
    refusal = {created["jti"]: {"err": "invalid_request", "description": "unknown schema"}}
    _, second = await poll(broker, "D", setErrs=refusal, returnImmediately=True)
    (deactivated,) = await verified(broker, "D", second["sets"])
    assert kinds(deactivated) == {"deactivate"} and second["moreAvailable"] is False
    error = await broker.pool.fetchval(
        "SELECT error FROM security_events WHERE jti = $1", created["jti"]
    )
    assert error == {"err": "invalid_request", "description": "unknown schema"}


async def test_a_receiver_refusing_a_set_makes_a_dead_letter_that_can_be_retried(
    db_url: str, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = [
        web.json_response({"err": "invalid_audience", "description": "not for us"}, status=400)
    ]
    received: list[str] = []

    async def receive(request: web.Request) -> web.Response:
        if answers:
            return answers.pop(0)
        received.append(await request.text())
        return web.Response(status=202)

    async with served("POST", receive) as endpoint:
        async for broker in federation(db_url, home, {}, monkeypatch, home.token, FAST, EVENTS):
            await subscribe(broker, "D", "--delivery", "push", "--endpoint", endpoint)
            await home_tool(broker, "POST", "/Users", new_user(unique("ev")))
            await quiesce(broker)
            code, out = await cli(broker_db(broker), "deliveries", "list", "--state", "dead")
            assert code == 0 and "invalid_audience" in out and "not for us" in out, out
            dead = await broker.pool.fetchval("SELECT id FROM outbox WHERE state = 'dead'")
            code, out = await cli(broker_db(broker), "deliveries", "retry", str(dead))
            assert code == 0, out
            await quiesce(broker)
            assert len(received) == 1
            state = await broker.pool.fetchval("SELECT state FROM security_events")
            assert state == "acknowledged"
