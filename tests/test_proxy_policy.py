"""Batched translation, scope and attribute policy, discovery, and the leak guard as a last line."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from broker.app import METRICS, POOL, PROXY
from broker.db import SQL_DIR, query
from broker.home import HomeClient
from broker.http import Answer
from broker.proxy import handlers
from broker.scim.knownpage import KnownPrefix, translate_known
from tests.conftest import QueryCounter
from tests.scim_support import (
    CORE_GROUP,
    ENTERPRISE,
    HOME_ID,
    Broker,
    Home,
    new_user,
    start_broker,
    unique,
)


@pytest.fixture
async def broker(db_url: str, home: Home) -> AsyncIterator[Broker]:
    tag = unique("team")
    domains = {
        "D1": {},
        "S": {
            "scope_filter": f'title eq "{tag}"',
            "read_attributes": ["userName", "title", "displayName", "members", ENTERPRISE],
            "write_attributes": ["userName", "title", "displayName"],
        },
    }
    async for running in start_broker(db_url, home, domains, pool_size=1):
        running.tag = tag  # type: ignore[attr-defined]
        yield running


def _page_of(home: Home, tag: str) -> None:
    """100 users with ``title`` tag, each in 5 groups."""
    users = [home.call("POST", "/Users", new_user(title=tag))[1] for _ in range(100)]
    members = [{"value": u["id"], "type": "User"} for u in users]
    for g in range(5):
        group = {"schemas": [CORE_GROUP], "displayName": unique(f"g{g}"), "members": members}
        assert home.call("POST", "/Groups", group)[0] == 201


async def _count_queries(broker: Broker, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
    counter = await _counted_queries(broker, params)
    return len(await counter.sent()), counter.page


# The statements of the mapping store (every query of sql/queries/mapping.sql): what a translation
# may send. The broker's pool has one connection, which its background work (the home poller,
# the sweeps, a cache reload) may borrow while the request runs: on a loaded machine one of
# those landed inside the counted window now and then. Only the mapping's statements count.
TRANSLATION = {
    query(name)
    for name in re.findall(
        r"^-- name: (\w+)$", (SQL_DIR / "queries" / "mapping.sql").read_text(), re.M
    )
}


class TranslationCounter(QueryCounter):
    def __call__(self, record: asyncpg.connection.LoggedQuery) -> None:
        if record.query in TRANSLATION:
            self.queries.append(record.query)


async def _counted_queries(broker: Broker, params: dict[str, str]) -> Any:
    counter = TranslationCounter()
    async with broker.app[POOL].acquire() as conn:  # the pool has one connection
        conn.add_query_logger(counter)
    status, page, _ = await broker.call("D1", "GET", "/Users", params=params)
    async with broker.app[POOL].acquire() as conn:
        conn.remove_query_logger(counter)
    assert status == 200, page
    counter.page = page  # type: ignore[attr-defined]
    return counter


async def test_a_100_user_page_is_one_read_per_direction_without_the_cache(
    db_url: str, home: Home
) -> None:
    tag = unique("page")
    _page_of(home, tag)
    async for broker in start_broker(db_url, home, {"D1": {}}, pool_size=1, cache_entries=0):
        await broker.call("D1", "GET", "/Users", params={"count": "1"})  # token and domain cached
        params = {"filter": f'title eq "{tag}"', "count": "100"}
        counted = await _counted_queries(broker, params)
        count, page = len(await counted.sent()), counted.page
        # Outbound, 600 references seen for the first time: one read, then one statement that
        # mints for all the entities the read left over; never one per ID.
        assert len(page["Resources"]) == 100 and count == 2, [q[:90] for q in counted.queries]
        count, again = await _count_queries(broker, params)
        assert again == page and count == 1  # known now: the read alone
        ids = [r["id"] for r in page["Resources"][:50]]
        id_filter = " or ".join(f'id eq "{i}"' for i in ids)
        count, page = await _count_queries(broker, {"filter": id_filter, "count": "100"})
        assert sorted(r["id"] for r in page["Resources"]) == sorted(ids)
        assert count == 2  # one inbound (50 IDs), one outbound


async def test_with_the_cache_a_repeated_page_needs_no_query(broker: Broker, home: Home) -> None:
    tag = unique("page")
    _page_of(home, tag)
    await broker.call("D1", "GET", "/Users", params={"count": "1"})
    params = {"filter": f'title eq "{tag}"', "count": "100"}
    first, page = await _count_queries(broker, params)
    again, same = await _count_queries(broker, params)
    assert (first, again) == (2, 0) and same == page  # a read and a mint, then the cache


async def test_scope_bounds_every_query_and_out_of_scope_entities_do_not_exist(
    broker: Broker, home: Home
) -> None:
    tag = broker.tag  # type: ignore[attr-defined]
    inside = home.call("POST", "/Users", new_user(title=tag, nickName="secret"))[1]
    outside = home.call("POST", "/Users", new_user(title="elsewhere"))[1]
    status, listed, _ = await broker.call("S", "GET", "/Users", params={"filter": "userName pr"})
    assert status == 200
    names = {r["userName"] for r in listed["Resources"]}
    assert inside["userName"] in names and outside["userName"] not in names
    assert listed["totalResults"] == len(listed["Resources"])
    # The read list hides what the domain may not read.
    assert all("nickName" not in r for r in listed["Resources"])
    # An out-of-scope entity that D1 knows is a 404 for S even by an ID S was given for it.
    _, d1_view, _ = await broker.call(
        "D1", "GET", "/Users", params={"filter": f'userName eq "{outside["userName"]}"'}
    )
    assert d1_view["totalResults"] == 1
    from broker.mapping.store import MappingStore

    s_ids = await MappingStore(broker.pool).resolve_outbound(
        "S", {outside["id"]: "User"}, mint=True
    )
    status, body, _ = await broker.call("S", "GET", f"/Users/{s_ids[outside['id']]}")
    assert (status, body["detail"]) == (404, "resource not found")


async def test_the_write_list_refuses_other_attributes_and_changes_nothing(
    broker: Broker, home: Home
) -> None:
    name = unique()
    status, body, _ = await broker.call("S", "POST", "/Users", new_user(name, nickName="x"))
    assert (status, body["scimType"]) == (400, "mutability")
    assert "nickName" in body["detail"]
    assert home.call("GET", f'/Users?filter=userName eq "{name}"')[1]["totalResults"] == 0


async def test_a_put_by_a_write_listed_domain_changes_only_its_attributes_and_only_in_scope(
    broker: Broker, home: Home
) -> None:
    """The PUT goes to home as the PATCH it amounts to, after one read that also holds the user
    to the domain's scope: a user that has left the scope is 404 and stays as it is."""
    tag = broker.tag  # type: ignore[attr-defined]
    name = unique()
    _, user = home.call("POST", "/Users", new_user(name, title=tag, nickName="keep"))
    status, listed, _ = await broker.call(
        "S", "GET", "/Users", params={"filter": f'userName eq "{name}"'}
    )
    assert status == 200, listed
    mine = listed["Resources"][0]["id"]
    put = new_user(name, title=tag, displayName="Changed")
    status, body, _ = await broker.call("S", "PUT", f"/Users/{mine}", put)
    assert status == 200, body
    now = home.call("GET", f"/Users/{user['id']}")[1]
    assert (now["displayName"], now["nickName"]) == ("Changed", "keep")
    home.call(
        "PATCH",
        f"/Users/{user['id']}",
        {
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "replace", "path": "title", "value": "elsewhere"}],
        },
    )
    status, body, _ = await broker.call("S", "PUT", f"/Users/{mine}", {**put, "title": "elsewhere"})
    assert status == 404, body
    assert home.call("GET", f"/Users/{user['id']}")[1]["displayName"] == "Changed"


async def test_discovery_documents_point_at_the_broker_and_announce_what_it_supports(
    broker: Broker,
) -> None:
    status, config, _ = await broker.call("D1", "GET", "/ServiceProviderConfig")
    assert status == 200 and config["bulk"]["supported"] and config["patch"]["supported"]
    assert [a["type"] for a in config["authenticationSchemes"]] == ["oauthbearertoken"]
    assert config["bulk"]["maxPayloadSize"] <= 1024 * 1024
    status, types, _ = await broker.call("D1", "GET", "/ResourceTypes")
    assert status == 200 and {t["name"] for t in types["Resources"]} >= {"User", "Group"}
    status, schemas, _ = await broker.call("D1", "GET", "/Schemas")
    assert status == 200 and len(schemas["Resources"]) >= 3
    assert broker.home.url not in json.dumps([config, types, schemas])


class PlantingHome(HomeClient):
    """The real home, with an internal ID planted in a free-text attribute of its answers."""

    planted: str = ""

    async def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        response = await super().request(method, path, **kwargs)
        body = response.body
        if isinstance(body, dict) and isinstance(body.get("Resources"), list):
            for resource in body["Resources"]:
                resource["nickName"] = f"see {self.planted}"
        return response


async def test_the_leak_guard_withholds_a_response_carrying_an_internal_id(
    broker: Broker, home: Home
) -> None:
    victim = home.call("POST", "/Users", new_user())[1]
    proxy = broker.app[PROXY]
    planting = PlantingHome(proxy.home.base_url, home.token)
    planting.planted = victim["id"]
    proxy.home = planting
    status, body, _ = await broker.call(
        "D1", "GET", "/Users", params={"filter": f'userName eq "{victim["userName"]}"'}
    )
    assert status == 502
    assert victim["id"] not in json.dumps(body)
    assert "correlation ID" in body["detail"]
    audited = await broker.pool.fetchrow(
        "SELECT actor, action, details FROM audit_log WHERE action = 'leak_blocked'"
    )
    assert audited["actor"] == "D1" and audited["details"]["correlation_id"] in body["detail"]
    metrics = broker.app[METRICS].registry.get_sample_value(
        "broker_leak_guard_blocks_total", {"domain": "D1"}
    )
    assert metrics == 1.0


async def test_out_of_scope_users_are_absent_as_members_and_managers_too(
    broker: Broker, home: Home
) -> None:
    tag = broker.tag  # type: ignore[attr-defined]
    inside = home.call("POST", "/Users", new_user(title=tag))[1]
    outside = home.call("POST", "/Users", new_user(title="elsewhere"))[1]
    managed = home.call(
        "POST",
        "/Users",
        new_user(
            title=tag,
            schemas=["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE],
            **{ENTERPRISE: {"manager": {"value": outside["id"]}}},
        ),
    )[1]
    name = unique("mixed")
    members = [{"value": inside["id"], "type": "User"}, {"value": outside["id"]}]
    assert (
        home.call(
            "POST", "/Groups", {"schemas": [CORE_GROUP], "displayName": name, "members": members}
        )[0]
        == 201
    )
    # Groups are not bounded by a users' scope, but the members they show are.
    status, groups, _ = await broker.call(
        "S", "GET", "/Groups", params={"filter": f'displayName eq "{name}"'}
    )
    assert status == 200 and groups["totalResults"] == 1
    _, users, _ = await broker.call(
        "S", "GET", "/Users", params={"filter": f'userName eq "{inside["userName"]}"'}
    )
    assert [m["value"] for m in groups["Resources"][0]["members"]] == [users["Resources"][0]["id"]]
    _, seen, _ = await broker.call(
        "S", "GET", "/Users", params={"filter": f'userName eq "{managed["userName"]}"'}
    )
    assert (
        ENTERPRISE not in seen["Resources"][0] or "manager" not in seen["Resources"][0][ENTERPRISE]
    )
    # The out-of-scope user was never given an ID in S.
    assert (
        await broker.pool.fetchval(
            "SELECT count(*) FROM id_mappings WHERE domain_id = 'S' AND internal_id = $1",
            outside["id"],
        )
        == 0
    )
    # The root search cannot be bounded by a users' scope: it is refused, not answered unbounded.
    status, body, _ = await broker.call(
        "S",
        "POST",
        "/.search",
        {"schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"]},
    )
    assert status == 403 and "/Users/.search" in body["detail"]


class ErringHome(HomeClient):
    """The real home, except that its error details name internal IDs of an unusual shape."""

    async def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        response = await super().request(method, path, **kwargs)
        if method == "PUT":
            internal = path.rsplit("/", 1)[1]
            body = {
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
                "status": "409",
                "scimType": "uniqueness",
                "detail": f"clash on {internal} and {internal.upper()}!",
            }
            return Answer(409, {}, body)
        return response


async def test_home_error_details_are_scrubbed_of_internal_ids(broker: Broker, home: Home) -> None:
    status, user, _ = await broker.call("D1", "POST", "/Users", new_user())
    proxy = broker.app[PROXY]
    proxy.home = ErringHome(proxy.home.base_url, home.token)
    status, body, _ = await broker.call(
        "D1", "PUT", f"/Users/{user['id']}", new_user(user["userName"])
    )
    assert (status, body["scimType"]) == (409, "uniqueness")
    assert body["detail"].startswith(f"clash on {user['id']} and ")
    _, at_home = home.call("GET", f'/Users?filter=userName eq "{user["userName"]}"')
    internal = at_home["Resources"][0]["id"]
    assert internal not in body["detail"] and internal.upper() not in body["detail"]


class EmptyHome(HomeClient):
    """The real home, except that reads of one resource answer 200 with no resource."""

    async def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        response = await super().request(method, path, **kwargs)
        if method == "GET" and path.startswith("/Users/"):
            return Answer(200, {}, ["not", "a", "resource"])
        return response


async def test_a_home_success_without_a_resource_is_a_502_not_an_error_with_status_200(
    broker: Broker, home: Home
) -> None:
    _, user, _ = await broker.call("D1", "POST", "/Users", new_user())
    proxy = broker.app[PROXY]
    proxy.home = EmptyHome(proxy.home.base_url, home.token)
    status, body, _ = await broker.call("D1", "GET", f"/Users/{user['id']}")
    assert (status, body["status"]) == (502, "502")
    assert "operator" in body["detail"]


async def test_a_page_the_cache_knows_is_rewritten_in_one_walk_and_answers_the_same(
    broker: Broker, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: the second read of a page takes the known walk (the cache's answers, no plan)
    for every document, and answers exactly what the general path answered the first time:
    the same IDs, references, locations and sealed versions, no home ID anywhere."""
    tag = unique("page")
    _page_of(home, tag)
    taken: list[tuple[int, int]] = []

    def spy(docs: list[dict[str, Any]], *args: Any, **kwargs: Any) -> KnownPrefix:
        known = translate_known(docs, *args, **kwargs)
        taken.append((known.count, len(docs)))
        return known

    monkeypatch.setattr(handlers, "translate_known", spy)
    params = {"filter": f'title eq "{tag}"', "count": "100"}
    status, first, _ = await broker.call("D1", "GET", "/Users", params=params)
    assert status == 200 and len(first["Resources"]) == 100
    assert taken[-1] == (0, 100)  # nothing cached yet: the general path for the whole page
    status, again, _ = await broker.call("D1", "GET", "/Users", params=params)
    assert taken[-1] == (100, 100) and (status, again) == (200, first)
    assert again["Resources"][0]["meta"]["version"]
    assert HOME_ID.search(json.dumps(again)) is None
    # One user read by its ID takes the same walk.
    user = again["Resources"][0]
    status, got, headers = await broker.call("D1", "GET", f"/Users/{user['id']}")
    assert taken[-1] == (1, 1) and (status, got) == (200, user)
    assert headers["ETag"] == user["meta"]["version"]
    # Groups: every member a reference, with its "type" (the walk's other branch).
    _, members, _ = await broker.call("D1", "GET", "/Users", params={**params, "count": "3"})
    _, at_home = home.call("GET", f'/Users?filter=title eq "{tag}"&count=3')
    for n in range(3):
        group = {
            "schemas": [CORE_GROUP],
            "displayName": f"{tag}-g{n}",
            "members": [{"value": u["id"], "type": "User"} for u in at_home["Resources"]],
        }
        assert home.call("POST", "/Groups", group)[0] == 201
    wanted = {"filter": f'displayName sw "{tag}-g"'}
    status, first, _ = await broker.call("D1", "GET", "/Groups", params=wanted)
    status, again, _ = await broker.call("D1", "GET", "/Groups", params=wanted)
    assert taken[-1] == (3, 3) and (status, again) == (200, first)
    shown = {r["id"] for r in members["Resources"]}
    assert all({m["value"] for m in g["members"]} == shown for g in again["Resources"])
    assert HOME_ID.search(json.dumps(again)) is None
