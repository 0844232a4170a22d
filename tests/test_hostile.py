"""Issue 14: every domain is hostile (DESIGN section 8). One test per class of attack.

Each test plays the attacker against a real home (scim2-server) and checks three things: what the
attacker is told (a SCIM error, never a 5xx, never a 200 it should not get), what home holds
afterwards (read straight from home, not through the broker), and what the broker queued for
peers. Variants of one class are tried in turn and every one that gets through is listed, so a
failure names all the holes of its class at once.
"""

from __future__ import annotations

import argparse
import json
import secrets
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
import yarl

from broker.cli.events import subscribe
from broker.domains import DomainStore
from broker.mapping.store import MappingStore
from broker.tokens import TokenStore
from tests.scim_support import (
    CORE_GROUP,
    CORE_USER,
    HOME_ID,
    RECORDER,
    Broker,
    Home,
    id_forms,
    new_user,
    start_broker,
    unique,
)

BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
SEARCH = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
S_READS = ["userName", "title", "displayName", "members"]
S_WRITES = ["displayName", "nickName"]
SW_WRITES = ["userName", "title", "displayName", "nickName", "members"]


@pytest.fixture
async def broker(db_url: str, home: Home) -> AsyncIterator[Broker]:
    """D1 (no policy); S (a scope, a read list and a narrow write list); SW (the same scope, may
    write members and create); R1 and R2 (read lists that do not overlap); P (a push peer);
    RO (D1's read-only token)."""
    tag = unique("team")
    scope = f'title eq "{tag}"'
    domains = {
        "D1": {},
        "S": {"scope_filter": scope, "read_attributes": S_READS, "write_attributes": S_WRITES},
        "SW": {"scope_filter": scope, "read_attributes": S_READS, "write_attributes": SW_WRITES},
        "R1": {"read_attributes": ["userName"]},
        "R2": {"read_attributes": ["nickName"]},
        "P": {"push": True, "scim_url": "http://peer.invalid/scim/v2"},
    }
    async for running in start_broker(db_url, home, domains):
        running.tokens["RO"], _ = await TokenStore(running.pool).issue("D1", scopes=["scim:read"])
        running.tag = tag  # type: ignore[attr-defined]
        # The home schema is loaded once, so that a request reaching home shows in to_home.
        assert (
            await running.call("D1", "GET", "/Users", params={"filter": 'userName eq "nobody"'})
        )[0] == 200
        yield running


class Holes:
    """The variants of one attack class that got through, reported together."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def check(self, ok: bool, variant: str, detail: Any = "") -> None:
        if not ok:
            self.found.append(f"{variant}: {str(detail)[:300]}")

    def assert_none(self) -> None:
        assert not self.found, f"{len(self.found)} hole(s):\n" + "\n".join(self.found)


def tag_of(broker: Broker) -> str:
    return str(broker.tag)  # type: ignore[attr-defined]


def home_create(home: Home, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, created = home.call("POST", path, body)
    assert status == 201, created
    return dict(created)


def at_home(home: Home, endpoint: str, internal_id: str) -> dict[str, Any] | None:
    """The resource as home holds it, without meta (versions move on a no-op write)."""
    status, body = home.call("GET", f"/{endpoint}/{internal_id}")
    if status == 404:
        return None
    assert status == 200, body
    return {k: v for k, v in body.items() if k != "meta"}


def home_named(home: Home, endpoint: str, attribute: str, value: str) -> int:
    status, found = home.call("GET", f"/{endpoint}?filter={attribute} eq {json.dumps(value)}")
    assert status == 200, found
    return int(found["totalResults"])


async def domain_id(broker: Broker, domain: str, user_name: str) -> str:
    """The domain's ID for the user named ``user_name`` (it learns it by listing)."""
    status, listed, _ = await broker.call(
        domain, "GET", "/Users", params={"filter": f'userName eq "{user_name}"'}
    )
    assert status == 200 and listed["totalResults"] == 1, listed
    return str(listed["Resources"][0]["id"])


async def group_id(broker: Broker, domain: str, name: str) -> str:
    status, listed, _ = await broker.call(
        domain, "GET", "/Groups", params={"filter": f'displayName eq "{name}"'}
    )
    assert status == 200 and listed["totalResults"] == 1, listed
    return str(listed["Resources"][0]["id"])


async def outbox_rows(broker: Broker) -> int:
    return int(await broker.pool.fetchval("SELECT count(*) FROM outbox"))


def patch(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_OP], "Operations": list(operations)}


def bulk(*operations: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"schemas": [BULK], "Operations": list(operations), **extra}


def is_error(status: int, body: Any, statuses: tuple[int, ...], *types: str | None) -> bool:
    """A SCIM error (RFC 7644 section 3.12) of one of ``statuses`` and, for a 400, ``types``."""
    if status not in statuses or not isinstance(body, dict) or body.get("schemas") != [ERROR]:
        return False
    return status != 400 or not types or body.get("scimType") in types


async def raw_call(
    broker: Broker,
    method: str,
    path: str,
    *,
    token: str = "D1",
    data: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any, str, Mapping[str, str]]:
    """A request sent byte for byte as given (no client-side normalising of the path): status,
    parsed body (None if not JSON), the text, the headers."""
    url = yarl.URL(broker.base.rsplit("/scim/v2", 1)[0] + path, encoded=True)
    sent = {**broker.auth(token), **(headers or {})} if token else dict(headers or {})
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=data, headers=sent) as response,
    ):
        text = await response.text(errors="replace")
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = None
        return response.status, parsed, text, dict(response.headers)


def home_calls_since(before: int) -> list[str]:
    return [f"{c.method} {c.url}" for c in RECORDER.to_home[before:]]


# ---------------------------------------------------------------------- 1. path smuggling

SMUGGLED = [
    "/scim/v2/Schemas/..%2F..%2FUsers%3Fcount%3D0",
    "/scim/v2/ResourceTypes/..%2F..%2FUsers%3Fcount%3D0",
    "/scim/v2/Schemas/..%2F..%2FServiceProviderConfig",
    "/scim/v2/Schemas/%2e%2e%2f%2e%2e%2fUsers",
    "/scim/v2/ResourceTypes/%2E%2E",
    "/scim/v2/Users/..%2FGroups",
    "/scim/v2/Users/%2e%2e",
    "/scim/v2/Groups/%2e%2e%2FUsers",
    "/scim/v2/Users/abc%3Fcount%3D0",
    "/scim/v2/Users/abc%23fragment",
    "/scim/v2/Users/abc%2Fdef",
    "/scim/v2/Users/abc%00",
    "/scim/v2/Users%00",
    "/scim/v2/Schemas/urn%00",
    "/scim/v2/ResourceTypes/User%00",
    "/scim/v2/Schemas/not-a-schema",
    "/scim/v2/ResourceTypes/Widget",
    "/scim/v2/Schemas/urn:ietf:params:scim:schemas:core:2.0:Nope",
]


async def test_a_smuggled_path_is_a_scim_4xx_and_never_reaches_home(broker: Broker) -> None:
    """Class 1: path smuggling (encoded ``/``, ``?``, ``#``, ``..`` and NUL; discovery IDs that
    name no schema or resource type), and the ``id sw`` oracle on every path."""
    holes = Holes()
    for path in SMUGGLED:
        before = len(RECORDER.to_home)
        status, body, text, _ = await raw_call(broker, "GET", path)
        holes.check(
            is_error(status, body, (400, 404), "invalidPath", "invalidValue"),
            f"GET {path}",
            f"{status} {text}",
        )
        holes.check(
            not home_calls_since(before), f"GET {path} reached home", home_calls_since(before)
        )
    # The known discovery documents are still served.
    status, body, _ = await broker.call("D1", "GET", "/Schemas/" + CORE_USER)
    holes.check(status == 200 and body.get("id") == CORE_USER, "GET /Schemas/<core user>", status)
    status, body, _ = await broker.call("D1", "GET", "/ResourceTypes/User")
    holes.check(status == 200 and body.get("name") == "User", "GET /ResourceTypes/User", status)
    # The ordering oracle on IDs: refused wherever a filter goes.
    user = home_create(broker.home, "/Users", new_user("alice-" + unique()))
    oracle = f'userName eq "{user["userName"]}" and id sw "d7"'
    for method, path, kwargs in (
        ("GET", "/Users", {"params": {"filter": oracle}}),
        ("GET", "/Groups", {"params": {"filter": 'id sw "d7" or displayName pr'}}),
        ("POST", "/Users/.search", {"body": {"schemas": [SEARCH], "filter": oracle}}),
        ("POST", "/.search", {"body": {"schemas": [SEARCH], "filter": oracle}}),
        ("GET", "/Users", {"params": {"filter": 'userName eq "x" or id gt "0"'}}),
        ("GET", "/Users", {"params": {"filter": 'ID Co "7"'}}),
    ):
        status, body, _ = await broker.call(
            "D1",
            method,
            path,
            kwargs.get("body"),
            **{k: v for k, v in kwargs.items() if k != "body"},
        )
        holes.check(
            is_error(status, body, (400,), "invalidFilter"), f"{method} {path} {kwargs}", status
        )
    holes.assert_none()


# ---------------------------------------------------------------------- 2. the write list

S_FORBIDDEN_OPS: list[tuple[str, dict[str, Any]]] = [
    ("userName", {"op": "replace", "path": "userName", "value": unique("taken")}),
    ("title", {"op": "replace", "path": "title", "value": "elsewhere"}),
    ("active", {"op": "replace", "path": "active", "value": False}),
    ("emails", {"op": "add", "path": "emails", "value": [{"value": "evil@example.com"}]}),
    ("emails removed", {"op": "remove", "path": "emails"}),
    ("title in a path-less value", {"op": "replace", "value": {"title": "elsewhere"}}),
    (
        "URN-qualified title",
        {"op": "replace", "path": f"{CORE_USER}:title", "value": "elsewhere"},
    ),
    (
        "URN-qualified key in a path-less value",
        {"op": "replace", "value": {f"{CORE_USER}:title": "elsewhere"}},
    ),
    ("TITLE", {"op": "replace", "path": "TITLE", "value": "elsewhere"}),
    ("Title in a path-less value", {"op": "replace", "value": {"Title": "elsewhere"}}),
    ("OP/Path/VALUE keys", {"OP": "replace", "Path": "title", "VALUE": "elsewhere"}),
    ("Op without path", {"Op": "Replace", "Value": {"displayName": "ok", "active": False}}),
]


async def test_the_write_list_holds_for_every_spelling_of_patch_put_and_bulk(
    broker: Broker, home: Home
) -> None:
    """Class 2: S may write only displayName and nickName; no spelling of another attribute,
    directly or in Bulk, changes home or queues anything for a peer."""
    holes = Holes()
    user = home_create(
        home,
        "/Users",
        new_user(
            title=tag_of(broker),
            displayName="Before",
            nickName="before",
            active=True,
            emails=[{"value": "alice@example.com", "primary": True}],
        ),
    )
    s_id = await domain_id(broker, "S", user["userName"])
    before = at_home(home, "Users", user["id"])
    queued = await outbox_rows(broker)

    def refused(status: int, body: Any) -> bool:
        return is_error(status, body, (400, 403), "mutability")

    async def unchanged(variant: str) -> None:
        nonlocal queued
        now = at_home(home, "Users", user["id"])
        holes.check(now == before, f"{variant}: home changed", now)
        holes.check(await outbox_rows(broker) == queued, f"{variant}: queued for peers")
        if now != before:  # put it back, so the next variant is tried on its own
            assert before is not None
            home.call("PUT", f"/Users/{user['id']}", before)
        queued = await outbox_rows(broker)

    def bulk_refused(status: int, body: Any) -> bool:
        """Refused whole, or the operation refused."""
        if refused(status, body):
            return True
        result = body.get("Operations", [{}])[0] if status == 200 else {}
        return result.get("status") in ("400", "403")

    for name, op in S_FORBIDDEN_OPS:
        status, body, _ = await broker.call("S", "PATCH", f"/Users/{s_id}", patch(op))
        holes.check(refused(status, body), f"PATCH {name}", f"{status} {body}")
        await unchanged(f"PATCH {name}")
        status, body, _ = await broker.call(
            "S",
            "POST",
            "/Bulk",
            bulk({"method": "PATCH", "path": f"/Users/{s_id}", "data": patch(op)}),
        )
        holes.check(bulk_refused(status, body), f"Bulk PATCH {name}", f"{status} {body}")
        await unchanged(f"Bulk PATCH {name}")
    # PUT, direct and in Bulk, naming an attribute S may not write.
    for spelling in ("title", "TITLE", f"{CORE_USER}:title"):
        doc = {"schemas": [CORE_USER], "displayName": "Put", spelling: "elsewhere"}
        status, body, _ = await broker.call("S", "PUT", f"/Users/{s_id}", doc)
        holes.check(refused(status, body), f"PUT {spelling}", f"{status} {body}")
        await unchanged(f"PUT {spelling}")
        status, body, _ = await broker.call(
            "S", "POST", "/Bulk", bulk({"method": "PUT", "path": f"/Users/{s_id}", "data": doc})
        )
        holes.check(bulk_refused(status, body), f"Bulk PUT {spelling}", f"{status} {body}")
        await unchanged(f"Bulk PUT {spelling}")
    name = unique("bulk-post")
    status, body, _ = await broker.call(
        "S",
        "POST",
        "/Bulk",
        bulk(
            {
                "method": "POST",
                "path": "/Users",
                "bulkId": "b",
                "data": new_user(name, title=tag_of(broker)),
            }
        ),
    )
    holes.check(bulk_refused(status, body), "Bulk POST", f"{status} {body}")
    holes.check(home_named(home, "Users", "userName", name) == 0, "Bulk POST created at home")
    # A PUT of what S may write leaves what it may not write as it was.
    status, body, _ = await broker.call(
        "S", "PUT", f"/Users/{s_id}", {"schemas": [CORE_USER], "displayName": "Replaced"}
    )
    after = at_home(home, "Users", user["id"]) or {}
    holes.check(status < 500, "PUT of writable attributes only", f"{status} {body}")
    for attribute in ("userName", "title", "active", "emails"):
        holes.check(
            after.get(attribute) == before.get(attribute) if before else False,
            f"a PUT by S cleared or changed {attribute}",
            after.get(attribute),
        )
    holes.assert_none()


# ---------------------------------------------------------------------- 3. key spellings


async def test_two_spellings_of_one_key_are_refused_and_no_untranslated_value_reaches_home(
    broker: Broker, home: Home
) -> None:
    """Class 3: key spellings (``value``/``VALUE``, URN-qualified attribute keys, ``Path``, a
    URN-qualified externalId path, two keys naming one attribute)."""
    holes = Holes()
    member = home_create(home, "/Users", new_user())
    d1_member = await domain_id(broker, "D1", member["userName"])
    name = unique("g")
    group = home_create(
        home,
        "/Groups",
        {"schemas": [CORE_GROUP], "displayName": name, "members": [{"value": member["id"]}]},
    )
    d1_group = await group_id(broker, "D1", name)
    group_before = at_home(home, "Groups", group["id"])

    def no_stranger_at_home(variant: str) -> None:
        now = at_home(home, "Groups", group["id"]) or {}
        holes.check(now == group_before, f"{variant}: home's group changed", now.get("members"))

    # A member with both value and VALUE (the second one made up).
    new_name = unique("g2")
    status, body, _ = await broker.call(
        "D1",
        "POST",
        "/Groups",
        {
            "schemas": [CORE_GROUP],
            "displayName": new_name,
            "members": [{"value": d1_member, "VALUE": "made-up-1"}],
        },
    )
    holes.check(
        is_error(status, body, (400,), "invalidSyntax"), "value and VALUE", f"{status} {body}"
    )
    holes.check(
        home_named(home, "Groups", "displayName", new_name) == 0, "value and VALUE: created"
    )
    for variant, op in (
        (
            "URN-keyed members in a path-less value",
            {"op": "add", "value": {f"{CORE_GROUP}:members": [{"value": "made-up-2"}]}},
        ),
        ("Path key", {"op": "add", "Path": "members", "value": [{"value": "made-up-3"}]}),
        (
            "PATH and Value keys",
            {"Op": "add", "PATH": "members", "Value": [{"value": "made-up-4"}]},
        ),
        (
            "VALUE inside a member",
            {"op": "add", "path": "members", "value": [{"VALUE": "made-up-5"}]},
        ),
        (
            "value and VALUE inside a member",
            {"op": "add", "path": "members", "value": [{"value": d1_member, "VALUE": "made-up-6"}]},
        ),
        ("members key in odd case", {"op": "add", "value": {"MEMBERS": [{"value": "made-up-7"}]}}),
    ):
        status, body, _ = await broker.call("D1", "PATCH", f"/Groups/{d1_group}", patch(op))
        holes.check(
            is_error(status, body, (400,), "invalidSyntax", "invalidValue"),
            variant,
            f"{status} {body}",
        )
        no_stranger_at_home(variant)
    strays = await broker.pool.fetchval(
        "SELECT count(*) FROM entities WHERE internal_id LIKE 'made-up-%'"
    )
    holes.check(strays == 0, "a made-up member became an entity", strays)
    for made_up in range(1, 8):
        count = await broker.pool.fetchval(
            "SELECT count(*) FROM id_mappings WHERE external_id = $1", f"made-up-{made_up}"
        )
        holes.check(count == 0, f"made-up-{made_up} got a mapping")
    # A URN-qualified externalId path is the domain's own externalId, never home's.
    user = home_create(home, "/Users", new_user(externalId="home-own"))
    d1_user = await domain_id(broker, "D1", user["userName"])
    for path in (f"{CORE_USER}:externalId", "EXTERNALID", f"{CORE_USER}:EXTERNALID"):
        await broker.call(
            "D1",
            "PATCH",
            f"/Users/{d1_user}",
            patch({"op": "replace", "path": path, "value": "mine"}),
        )
        await broker.call(
            "D1", "PATCH", f"/Users/{d1_user}", patch({"op": "replace", "value": {path: "mine"}})
        )
        holes.check(
            (at_home(home, "Users", user["id"]) or {}).get("externalId") == "home-own",
            f"PATCH {path} wrote home's externalId",
        )
    # Two keys naming one attribute.
    for variant, keys in (
        ("displayName and DISPLAYNAME", {"displayName": "a", "DISPLAYNAME": "b"}),
        ("title and its URN", {"title": "a", f"{CORE_USER}:title": "b"}),
        ("nickName and NickName", {"nickName": "a", "NickName": "b"}),
    ):
        name = unique("twice")
        status, body, _ = await broker.call("D1", "POST", "/Users", new_user(name, **keys))
        holes.check(
            is_error(status, body, (400,), "invalidSyntax"), f"POST {variant}", f"{status} {body}"
        )
        holes.check(home_named(home, "Users", "userName", name) == 0, f"POST {variant}: created")
        status, body, _ = await broker.call(
            "D1", "PATCH", f"/Users/{d1_user}", patch({"op": "replace", "value": keys})
        )
        holes.check(
            is_error(status, body, (400,), "invalidSyntax"), f"PATCH {variant}", f"{status} {body}"
        )
    # Never an untranslated value at home, in any group.
    _, groups = home.call("GET", "/Groups?count=10000")
    strays = [
        m.get("value")
        for g in groups.get("Resources", [])
        for m in g.get("members", [])
        if not HOME_ID.fullmatch(str(m.get("value")))
    ]
    holes.check(not strays, "untranslated member values at home", strays)
    holes.assert_none()


# ---------------------------------------------------------------------- 4. scope


async def test_scope_bounds_bulk_group_member_writes_and_creates(
    broker: Broker, home: Home
) -> None:
    """Class 4: scope for Bulk operations, group writes (members it cannot see stay) and
    creates (outside its scope: refused)."""
    holes = Holes()
    tag = tag_of(broker)
    inside = home_create(home, "/Users", new_user(title=tag, displayName="Alpha in"))
    outside = home_create(home, "/Users", new_user(title="elsewhere", displayName="Alpha out"))
    # A name SW holds for the outside user (say it was in scope once, or a stale mapping).
    stale = (
        await MappingStore(broker.pool).resolve_outbound("SW", {outside["id"]: "User"}, mint=True)
    )[outside["id"]]
    outside_before = at_home(home, "Users", outside["id"])
    status, body, _ = await broker.call(
        "SW",
        "POST",
        "/Bulk",
        bulk(
            {
                "method": "PATCH",
                "path": f"/Users/{stale}",
                "data": patch({"op": "replace", "path": "displayName", "value": "Bulked"}),
            },
            {"method": "DELETE", "path": f"/Users/{stale}"},
        ),
    )
    statuses = [r.get("status") for r in body.get("Operations", [])] if status == 200 else status
    holes.check(statuses == ["404", "404"], "Bulk PATCH/DELETE out of scope", statuses)
    holes.check(
        at_home(home, "Users", outside["id"]) == outside_before, "out-of-scope user changed"
    )
    # Group writes: the members SW cannot see stay members at home.
    sw_inside = await domain_id(broker, "SW", inside["userName"])
    members = [
        {"value": inside["id"], "display": "Alpha in"},
        {"value": outside["id"], "display": "Alpha out"},
    ]
    writes: list[tuple[str, str, Any]] = [
        (
            "PUT",
            "",
            {"schemas": [CORE_GROUP], "displayName": "{name}", "members": [{"value": sw_inside}]},
        ),
        ("PATCH", "", patch({"op": "replace", "path": "members", "value": [{"value": sw_inside}]})),
        ("PATCH", "", patch({"op": "replace", "value": {"members": [{"value": sw_inside}]}})),
        ("PATCH", "", patch({"op": "remove", "path": "members"})),
        ("PATCH", "", patch({"op": "remove", "path": 'members[display sw "Alpha"]'})),
        ("PATCH", "", patch({"op": "remove", "path": 'members[value ne "x"]'})),
        ("BULK", "PUT", {"schemas": [CORE_GROUP], "displayName": "{name}", "members": []}),
        ("BULK", "PATCH", patch({"op": "remove", "path": "members"})),
    ]
    for method, inner, doc in writes:
        name = unique("mixed")
        group = home_create(
            home, "/Groups", {"schemas": [CORE_GROUP], "displayName": name, "members": members}
        )
        sw_group = await group_id(broker, "SW", name)
        doc = json.loads(json.dumps(doc).replace("{name}", name))
        variant = f"{method} {inner} {json.dumps(doc)[:120]}"
        if method == "BULK":
            status, body, _ = await broker.call(
                "SW",
                "POST",
                "/Bulk",
                bulk({"method": inner, "path": f"/Groups/{sw_group}", "data": doc}),
            )
        else:
            status, body, _ = await broker.call("SW", method, f"/Groups/{sw_group}", doc)
        holes.check(status < 500, variant, f"{status} {body}")
        kept = {m["value"] for m in (at_home(home, "Groups", group["id"]) or {}).get("members", [])}
        holes.check(outside["id"] in kept, f"{variant}: removed a member SW cannot see")
    # Creating a user outside its scope.
    for title in ("elsewhere", None):
        name = unique("outside")
        doc = new_user(name, **({"title": title} if title else {}))
        status, body, _ = await broker.call("SW", "POST", "/Users", doc)
        holes.check(
            is_error(status, body, (400, 403)), f"POST with title {title}", f"{status} {body}"
        )
        holes.check(
            home_named(home, "Users", "userName", name) == 0, f"POST with title {title}: created"
        )
        status, body, _ = await broker.call(
            "SW",
            "POST",
            "/Bulk",
            bulk(
                {
                    "method": "POST",
                    "path": "/Users",
                    "bulkId": "x",
                    "data": new_user(name + "b", title="elsewhere"),
                }
            ),
        )
        holes.check(
            home_named(home, "Users", "userName", name + "b") == 0,
            "Bulk POST out of scope: created",
        )
    holes.assert_none()


# ---------------------------------------------------------------------- 5. read-list oracles


async def test_attributes_a_domain_cannot_read_cannot_be_filtered_or_sorted_on(
    broker: Broker, home: Home
) -> None:
    """Class 5: read-list oracles (filter, value-path filter, sortBy, in every spelling, in GET
    and POST /.search; attributes=)."""
    holes = Holes()
    user = home_create(
        home, "/Users", new_user(title=tag_of(broker), emails=[{"value": "alice@example.com"}])
    )
    filters = [
        'emails.value sw "alice@"',
        'emails[value sw "a"]',
        'emails co "alice"',
        "emails pr",
        f'{CORE_USER}:emails.value sw "alice@"',
        'EMAILS.VALUE sw "alice@"',
        'Emails[Value sw "a"]',
        f'userName pr and not ({CORE_USER}:Emails[type eq "work"])',
        "nickName pr",
        "name.givenName pr",
    ]
    for expression in filters:
        status, body, _ = await broker.call("S", "GET", "/Users", params={"filter": expression})
        holes.check(
            is_error(status, body, (400,), "invalidFilter"),
            f"GET filter {expression}",
            f"{status} {body}",
        )
        status, body, _ = await broker.call(
            "S", "POST", "/Users/.search", {"schemas": [SEARCH], "filter": expression}
        )
        holes.check(
            is_error(status, body, (400,), "invalidFilter"),
            f"search filter {expression}",
            f"{status} {body}",
        )
    for sort in ("emails.value", "EMAILS.value", f"{CORE_USER}:emails.value", "emails", "nickName"):
        status, body, _ = await broker.call("S", "GET", "/Users", params={"sortBy": sort})
        holes.check(
            is_error(status, body, (400,), "invalidValue"), f"GET sortBy {sort}", f"{status} {body}"
        )
        status, body, _ = await broker.call(
            "S", "POST", "/Users/.search", {"schemas": [SEARCH], "sortBy": sort}
        )
        holes.check(
            is_error(status, body, (400,), "invalidValue"),
            f"search sortBy {sort}",
            f"{status} {body}",
        )
    s_id = await domain_id(broker, "S", user["userName"])
    for attributes in ("emails", "EMAILS", f"{CORE_USER}:emails", "emails.value"):
        status, body, _ = await broker.call(
            "S", "GET", f"/Users/{s_id}", params={"attributes": attributes}
        )
        holes.check(
            status == 200 and "alice@" not in json.dumps(body), f"GET attributes={attributes}", body
        )
        status, body, _ = await broker.call(
            "S",
            "GET",
            "/Users",
            params={"attributes": attributes, "filter": f'userName eq "{user["userName"]}"'},
        )
        holes.check(
            status == 200 and "alice@" not in json.dumps(body),
            f"list attributes={attributes}",
            body,
        )
    holes.assert_none()


# ---------------------------------------------------------------------- 6. guard denial


async def test_what_one_domain_writes_never_denies_another_domain_service(
    broker: Broker, home: Home
) -> None:
    """Class 6: guard denial (ID-shaped values a domain writes make no one's read a 502)."""
    holes = Holes()
    tag = tag_of(broker)
    hexes = [secrets.token_hex(16), secrets.token_hex(16).upper(), str(uuid.uuid4())]
    names: list[str] = []
    try:
        for planted in hexes:
            names += [unique("planted"), unique("titled")]
            doc = new_user(names[-2], title=tag, displayName=planted, nickName=planted)
            status, body, _ = await broker.call("D1", "POST", "/Users", doc)
            holes.check(status == 201, f"D1 creates a user named {planted}", f"{status} {body}")
            status, titled, _ = await broker.call("D1", "POST", "/Users", new_user(names[-1]))
            assert status == 201, titled
            status, body, _ = await broker.call(
                "D1",
                "PATCH",
                f"/Users/{titled['id']}",
                patch({"op": "replace", "path": "title", "value": planted}),
            )
            holes.check(status in (200, 204), f"D1 writes {planted} into title", f"{status} {body}")
        for name in names:
            for domain in ("D1", "S"):
                if domain == "S" and name.startswith("titled"):
                    continue  # out of S's scope
                status, listed, _ = await broker.call(
                    domain, "GET", "/Users", params={"filter": f'userName eq "{name}"'}
                )
                holes.check(status == 200, f"{domain} finds {name}", f"{status} {listed}")
                if status != 200 or not listed["Resources"]:
                    continue
                rid = listed["Resources"][0]["id"]
                status, body, _ = await broker.call(domain, "GET", f"/Users/{rid}")
                holes.check(status == 200, f"{domain} reads {name}", f"{status} {body}")
        # A page holding every user D1 wrote to (home is shared by the session: other tests plant
        # real internal IDs in free text on purpose, and a page with those fails closed).
        page = " or ".join(f'userName eq "{name}"' for name in names)
        for domain in ("D1", "S"):
            status, body, _ = await broker.call(
                domain, "GET", "/Users", params={"filter": page, "count": "1000"}
            )
            holes.check(status == 200, f"{domain} reads the /Users page", f"{status} {body}")
            expected = len(names) if domain == "D1" else len(names) // 2
            holes.check(
                status != 200 or body["totalResults"] == expected,
                f"{domain}'s page holds every user it may see",
                body,
            )
    finally:  # home is shared: what D1 wrote here must not deny the other tests service
        for name in names:
            _, found = home.call("GET", f'/Users?filter=userName eq "{name}"')
            for resource in found.get("Resources", []):
                home.call("DELETE", f"/Users/{resource['id']}")
    holes.assert_none()


# ---------------------------------------------------------------------- 8. bad input


async def test_bad_input_is_a_4xx_and_changes_nothing(broker: Broker, home: Home) -> None:
    """Class 8: bad input (invalid UTF-8 and UTF-16, deep nesting, meta.location, NUL in a path
    ID, member value, externalId and poll ack, duplicate JSON keys, over-long strings, Bulk
    failOnErrors after a broker refusal)."""
    holes = Holes()

    async def refused_create(
        variant: str, data: bytes | str, name: str, *, path: str = "/scim/v2/Users"
    ) -> None:
        status, body, text, _ = await raw_call(broker, "POST", path, data=data)
        holes.check(
            is_error(status, body, (400, 413), "invalidSyntax", "invalidValue"),
            variant,
            f"{status} {text[:200]}",
        )
        holes.check(home_named(home, "Users", "userName", name) == 0, f"{variant}: created at home")

    name = unique("utf8")
    await refused_create(
        "invalid UTF-8",
        b'{"schemas":["%s"],"userName":"%s","displayName":"\xff\xfe"}'
        % (CORE_USER.encode(), name.encode()),
        name,
    )
    name = unique("utf16")
    await refused_create("UTF-16", json.dumps(new_user(name)).encode("utf-16"), name)
    name = unique("deep")
    deep = "[" * 300 + "]" * 300
    await refused_create(
        "nested 300 levels",
        f'{{"schemas":["{CORE_USER}"],"userName":"{name}","nickName":{deep}}}',
        name,
    )
    name = unique("deepobj")
    deep_obj = '{"a":' * 300 + "1" + "}" * 300
    await refused_create(
        "object nested 300 levels",
        f'{{"schemas":["{CORE_USER}"],"userName":"{name}","x":{deep_obj}}}',
        name,
    )
    first, second = unique("dup"), unique("dup")
    status, body, text, _ = await raw_call(
        broker,
        "POST",
        "/scim/v2/Users",
        data=f'{{"schemas":["{CORE_USER}"],"userName":"{first}","userName":"{second}"}}',
    )
    holes.check(
        is_error(status, body, (400,), "invalidSyntax"), "duplicate JSON keys", f"{status} {text}"
    )
    holes.check(
        home_named(home, "Users", "userName", first) + home_named(home, "Users", "userName", second)
        == 0,
        "duplicate keys: created",
    )
    name = "long-" + "x" * 100_000
    status, body, text, _ = await raw_call(
        broker, "POST", "/scim/v2/Users", data=json.dumps(new_user(name))
    )
    if status == 201:  # what it wrote would slow every later listing; take it away
        internal = await broker.pool.fetchval(
            "SELECT internal_id FROM id_mappings WHERE domain_id = 'D1' AND external_id = $1",
            body["id"],
        )
        home.call("DELETE", f"/Users/{internal}")
    holes.check(
        is_error(status, body, (400, 413)), "100,000-character userName", f"{status} {text[:200]}"
    )
    status, body, text, _ = await raw_call(
        broker,
        "POST",
        "/scim/v2/Users/.search",
        data=json.dumps({"schemas": [SEARCH], "filter": f'userName eq "{"x" * 200_000}"'}),
    )
    holes.check(
        is_error(status, body, (400, 413, 414), "invalidFilter", "invalidValue"),
        "200,000-character filter value",
        f"{status} {text[:200]}",
    )
    # meta.location and NUL in a path ID.
    status, user, _ = await broker.call("D1", "POST", "/Users", new_user(displayName="Same"))
    assert status == 201, user
    before_outbox = await outbox_rows(broker)
    for op in (
        {"op": "replace", "path": "meta.location", "value": "http://evil.example/Users/1"},
        {"op": "replace", "value": {"meta": {"location": "http://evil.example/Users/1"}}},
        {"op": "replace", "path": "id", "value": "mine"},
    ):
        status, body, _ = await broker.call("D1", "PATCH", f"/Users/{user['id']}", patch(op))
        holes.check(
            is_error(status, body, (400,), "mutability", "invalidPath", "invalidValue"),
            f"PATCH {op}",
            f"{status} {body}",
        )
    _, after, _ = await broker.call("D1", "GET", f"/Users/{user['id']}")
    holes.check(
        after.get("meta", {}).get("location") == f"{broker.base}/Users/{user['id']}",
        "meta.location moved",
        after.get("meta"),
    )
    holes.check(await outbox_rows(broker) == before_outbox, "PATCH of meta queued for peers")
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        status, body, text, _ = await raw_call(
            broker,
            method,
            f"/scim/v2/Users/{user['id']}%00",
            data="{}" if method in ("PUT", "PATCH") else None,
        )
        holes.check(
            is_error(status, body, (400, 404)),
            f"{method} NUL in the path ID",
            f"{status} {text[:200]}",
        )
    # NUL in a member value and in externalId: refused, nothing at home, a retry works.
    name = unique("nulgroup")
    status, body, _ = await broker.call(
        "D1",
        "POST",
        "/Groups",
        {
            "schemas": [CORE_GROUP],
            "displayName": name,
            "members": [{"value": user["id"] + "\u0000"}],
        },
    )
    holes.check(
        is_error(status, body, (400,), "invalidValue", "invalidSyntax"),
        "NUL in a member value",
        f"{status} {body}",
    )
    holes.check(
        home_named(home, "Groups", "displayName", name) == 0, "NUL member: group created at home"
    )
    name = unique("nulext")
    status, body, _ = await broker.call(
        "D1", "POST", "/Users", new_user(name, externalId="hr\u00001")
    )
    holes.check(
        is_error(status, body, (400,), "invalidValue", "invalidSyntax"),
        "NUL in externalId",
        f"{status} {body}",
    )
    holes.check(
        home_named(home, "Users", "userName", name) == 0, "NUL externalId: user created at home"
    )
    status, body, _ = await broker.call("D1", "POST", "/Users", new_user(name, externalId="hr-1"))
    holes.check(status == 201, "the retry without the NUL", f"{status} {body}")
    status, body, _ = await broker.call(
        "D1",
        "PATCH",
        f"/Users/{user['id']}",
        patch({"op": "replace", "path": "externalId", "value": "a\u0000"}),
    )
    holes.check(
        is_error(status, body, (400,), "invalidValue", "invalidSyntax"),
        "NUL in a PATCHed externalId",
        f"{status} {body}",
    )
    # NUL in a poll acknowledgement.
    await subscribe(
        broker.pool,
        argparse.Namespace(
            domain="D1",
            delivery="poll",
            endpoint=None,
            token_env=None,
            resource_types=None,
            attributes=None,
            detail="notice",
            identity_events=False,
        ),
    )
    status, body, text, _ = await raw_call(
        broker,
        "POST",
        "/events/poll",
        data=json.dumps({"ack": ["\u0000"], "maxEvents": 0, "returnImmediately": True}),
        headers={"Content-Type": "application/json"},
    )
    holes.check(status == 400, "NUL in a poll ack", f"{status} {text[:200]}")
    # Bulk failOnErrors 1: the broker refuses the first operation; the second must not run.
    status, target, _ = await broker.call("D1", "POST", "/Users", new_user(displayName="Untouched"))
    status, body, _ = await broker.call(
        "D1",
        "POST",
        "/Bulk",
        bulk(
            {
                "method": "POST",
                "path": "/Groups",
                "bulkId": "g",
                "data": {
                    "schemas": [CORE_GROUP],
                    "displayName": unique(),
                    "members": [{"value": "stranger"}],
                },
            },
            {
                "method": "PATCH",
                "path": f"/Users/{target['id']}",
                "data": patch({"op": "replace", "path": "displayName", "value": "Ran"}),
            },
            failOnErrors=1,
        ),
    )
    _, seen, _ = await broker.call("D1", "GET", f"/Users/{target['id']}")
    holes.check(
        seen.get("displayName") == "Untouched",
        "Bulk failOnErrors 1 ran the operation after a refusal",
        body,
    )
    holes.assert_none()


# ---------------------------------------------------------------------- 9. exposure (metrics)


async def test_metrics_are_not_served_on_the_domain_listener(broker: Broker) -> None:
    """Class 9 (its part here): /metrics lives on the admin listener only."""
    holes = Holes()
    for token in ("", "D1", "RO"):
        status, _, text, _ = await raw_call(broker, "GET", "/metrics", token=token)
        holes.check(
            status == 404, f"GET /metrics with token {token or 'none'}", f"{status} {text[:120]}"
        )
    holes.assert_none()


# ---------------------------------------------------------------------- 10. guard misses


def _plants(internal_id: str) -> list[str]:
    dashed = str(uuid.UUID(internal_id))
    return [
        f"emp-{internal_id}",
        f"x_{internal_id.upper()}",
        f"abc{internal_id}",
        internal_id.upper(),
        dashed,
        dashed.upper(),
        f"{internal_id}z",
    ]


async def _plant_and_read(
    broker: Broker,
    home: Home,
    victim: dict[str, Any],
    d1_victim: str,
    plants: list[str],
    exposed: Any,
    holes: Holes,
) -> None:
    """Home's tools write each of ``plants`` into the victim's free text; D1 reads it."""
    for planted in plants:
        for attribute in ("title", "nickName"):
            status, body = home.call(
                "PATCH",
                f"/Users/{victim['id']}",
                patch({"op": "replace", "path": attribute, "value": planted}),
            )
            assert status in (200, 204), body
            for path, params in (
                (f"/Users/{d1_victim}", {}),
                ("/Users", {"filter": f'userName eq "{victim["userName"]}"'}),
                ("/Users", {"count": "1000"}),
            ):
                status, answer, text, headers = await raw_call(
                    broker, "GET", f"/scim/v2{path}?{urllib.parse.urlencode(params)}"
                )
                variant = f"{attribute}={planted} via {path} {params}"
                holes.check(not exposed(text + json.dumps(headers)), variant, status)
                if status == 502:
                    holes.check(
                        "correlation ID" in str((answer or {}).get("detail")),
                        f"{variant}: a 502 without a correlation ID",
                        answer,
                    )
                else:
                    holes.check(status == 200, variant, status)
            home.call("PATCH", f"/Users/{victim['id']}", patch({"op": "remove", "path": attribute}))


async def test_internal_ids_home_writes_into_free_text_never_reach_a_domain(
    broker: Broker, home: Home
) -> None:
    """Class 10: guard misses (glued, upper-case and UUID forms of internal IDs that home's own
    tools put into free text; internal IDs in home's error details and headers)."""
    holes = Holes()
    victim = home_create(home, "/Users", new_user())
    other = home_create(home, "/Users", new_user())
    d1_victim = await domain_id(broker, "D1", victim["userName"])

    def exposed(text: str) -> set[str]:
        return id_forms(text) & {victim["id"], other["id"]}

    try:
        await _plant_and_read(
            broker,
            home,
            victim,
            d1_victim,
            [*_plants(victim["id"]), *_plants(other["id"])],
            exposed,
            holes,
        )
    finally:
        for attribute in ("title", "nickName"):
            home.call("PATCH", f"/Users/{victim['id']}", patch({"op": "remove", "path": attribute}))
    # Errors: a Bulk whose operations home refuses (a duplicate userName, a conflict).
    d1_other = await domain_id(broker, "D1", other["userName"])
    _, _, text, headers = await raw_call(
        broker,
        "POST",
        "/scim/v2/Bulk",
        data=json.dumps(
            bulk(
                {
                    "method": "POST",
                    "path": "/Users",
                    "bulkId": "a",
                    "data": new_user(victim["userName"]),
                },
                {
                    "method": "PUT",
                    "path": f"/Users/{d1_other}",
                    "data": new_user(victim["userName"]),
                },
                {
                    "method": "PATCH",
                    "path": f"/Users/{d1_other}",
                    "data": patch(
                        {"op": "replace", "path": "userName", "value": victim["userName"]}
                    ),
                },
                {
                    "method": "PATCH",
                    "path": f"/Users/{d1_other}",
                    "data": patch({"op": "add", "path": "groups", "value": [{"value": d1_victim}]}),
                },
            )
        ),
    )
    holes.check(
        not exposed(text + json.dumps(headers)), "home's error details in a Bulk answer", text[:300]
    )
    holes.assert_none()


# ---------------------------------------------------------------------- 11. correlation


async def test_versions_and_timestamps_do_not_link_one_user_across_domains(
    broker: Broker, home: Home
) -> None:
    """Class 11: correlation beyond IDs (ETag and meta.version per domain; coarse timestamps for
    an unlinkable domain; If-Match with another domain's ETag)."""
    holes = Holes()
    user = home_create(home, "/Users", new_user(nickName=unique("nick")))
    seen = {}
    # Each domain finds the user by an attribute it may read (R2 cannot name userName).
    finder = {"R1": "userName", "R2": "nickName", "D1": "userName"}
    for domain in ("R1", "R2", "D1"):
        name = finder[domain]
        status, listed, _ = await broker.call(
            domain, "GET", "/Users", params={"filter": f'{name} eq "{user[name]}"'}
        )
        assert status == 200 and listed["totalResults"] == 1, listed
        rid = listed["Resources"][0]["id"]
        status, got, headers = await broker.call(domain, "GET", f"/Users/{rid}")
        assert status == 200, got
        seen[domain] = (rid, headers.get("ETag"), got.get("meta", {}).get("version"))
    holes.check(seen["R1"][1] != seen["R2"][1], "R1 and R2 see one ETag", seen)
    holes.check(seen["R1"][2] != seen["R2"][2], "R1 and R2 see one meta.version", seen)
    d1_id = seen["D1"][0]
    status, body, _ = await broker.call(
        "D1",
        "PATCH",
        f"/Users/{d1_id}",
        patch({"op": "replace", "path": "displayName", "value": "Mine"}),
        headers={"If-Match": seen["R1"][1] or 'W/"1"'},
    )
    holes.check(status == 412, "If-Match with R1's ETag", f"{status} {body}")
    _, _, headers = await broker.call("D1", "GET", f"/Users/{d1_id}")
    status, body, _ = await broker.call(
        "D1",
        "PATCH",
        f"/Users/{d1_id}",
        patch({"op": "replace", "path": "displayName", "value": "Mine"}),
        headers={"If-Match": headers.get("ETag", "")},
    )
    holes.check(status in (200, 204), "If-Match with D1's own ETag", f"{status} {body}")
    # An unlinkable domain sees timestamps to the second.
    try:
        await DomainStore(broker.pool).add("U", unlinkable=True)  # type: ignore[call-arg]
    except TypeError as exc:
        holes.check(False, "DomainStore.add(unlinkable=True)", exc)
        holes.assert_none()
    broker.tokens["U"], _ = await TokenStore(broker.pool).issue("U")
    status, listed, _ = await broker.call(
        "U", "GET", "/Users", params={"filter": f'userName eq "{user["userName"]}"'}
    )
    meta = listed["Resources"][0]["meta"] if status == 200 else {}
    for stamp in ("created", "lastModified"):
        value = str(meta.get(stamp, ""))
        holes.check(bool(value) and "." not in value, f"U sees meta.{stamp} {value!r}")
    holes.assert_none()


# ---------------------------------------------------------------------- Location


async def test_a_created_resource_s_location_header_is_its_meta_location_in_the_domains_terms(
    broker: Broker,
) -> None:
    """The Location header of a 201 (RFC 7644 section 3.3): the broker's base and the domain's ID."""
    holes = Holes()
    for path, doc in (
        ("/Users", new_user()),
        ("/Groups", {"schemas": [CORE_GROUP], "displayName": unique("g")}),
    ):
        status, body, headers = await broker.call("D1", "POST", path, doc)
        assert status == 201, body
        expected = f"{broker.base}{path}/{body['id']}"
        holes.check(
            headers.get("Location") == expected, f"POST {path} Location", headers.get("Location")
        )
        holes.check(
            body["meta"]["location"] == expected, f"POST {path} meta.location", body["meta"]
        )
    holes.assert_none()
