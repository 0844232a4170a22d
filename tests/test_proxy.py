"""The domain-facing SCIM proxy in front of a real home (scim2-server): every ID place, both ways."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.scim_support import (
    ACME,
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
    async for running in start_broker(db_url, home, {"D1": {}, "D2": {}}):
        yield running


def home_create(home: Home, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, created = home.call("POST", path, body)
    assert status == 201, created
    return created


async def test_two_domains_reading_one_user_get_different_ids_and_never_the_internal_one(
    broker: Broker, home: Home
) -> None:
    boss = home_create(home, "/Users", new_user())
    user = home_create(
        home,
        "/Users",
        new_user(
            schemas=["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE],
            **{ENTERPRISE: {"manager": {"value": boss["id"]}}},
        ),
    )
    # Domains first learn IDs by listing.
    views = {}
    for domain in ("D1", "D2"):
        status, listed, _ = await broker.call(
            domain, "GET", "/Users", params={"filter": f'userName eq "{user["userName"]}"'}
        )
        assert status == 200 and listed["totalResults"] == 1
        views[domain] = listed["Resources"][0]
    d1, d2 = views["D1"], views["D2"]
    assert d1["id"] != d2["id"]
    assert user["id"] not in (d1["id"], d2["id"])
    assert d1["meta"]["location"] == f"{broker.base}/Users/{d1['id']}"
    manager_d1 = d1[ENTERPRISE]["manager"]["value"]
    assert manager_d1 != boss["id"] and not HOME_ID.fullmatch(manager_d1)
    # GET by the domain's own ID works; the manager reference is the domain's ID for the boss.
    status, got, headers = await broker.call("D1", "GET", f"/Users/{d1['id']}")
    assert status == 200 and got["id"] == d1["id"] and headers["ETag"] == got["meta"]["version"]
    status, boss_d1, _ = await broker.call("D1", "GET", f"/Users/{manager_d1}")
    assert status == 200 and boss_d1["userName"] == boss["userName"]


async def test_another_domains_id_and_a_guessed_internal_id_get_the_same_404_as_a_random_string(
    broker: Broker, home: Home
) -> None:
    user = home_create(home, "/Users", new_user())
    _, listed, _ = await broker.call(
        "D1", "GET", "/Users", params={"filter": f'userName eq "{user["userName"]}"'}
    )
    d1_id = listed["Resources"][0]["id"]
    answers = []
    for probe in (d1_id, user["id"], "random-string-123"):
        status, body, _ = await broker.call("D2", "GET", f"/Users/{probe}")
        answers.append((status, body["detail"], body.get("scimType")))
    assert answers[0] == answers[1] == answers[2] == (404, "resource not found", None)


async def test_create_with_external_id_keeps_it_for_the_creating_domain_only(
    broker: Broker, home: Home
) -> None:
    status, created, headers = await broker.call(
        "D1", "POST", "/Users", new_user(externalId="d1-emp-7")
    )
    assert status == 201, created
    assert created["externalId"] == "d1-emp-7"
    assert headers["Location"] == f"{broker.base}/Users/{created['id']}"
    # Home never holds D1's externalId; D2 never sees it.
    _, at_home = home.call("GET", f'/Users?filter=userName eq "{created["userName"]}"')
    assert "externalId" not in at_home["Resources"][0]
    _, seen_by_d2, _ = await broker.call(
        "D2", "GET", "/Users", params={"filter": f'userName eq "{created["userName"]}"'}
    )
    assert "externalId" not in seen_by_d2["Resources"][0]
    # D1 can find it by its externalId (Kelly Grizzle's usage pattern in seed 002).
    status, found, _ = await broker.call(
        "D1", "GET", "/Users", params={"filter": 'externalId eq "d1-emp-7"'}
    )
    assert status == 200 and [r["id"] for r in found["Resources"]] == [created["id"]]
    _, none_for_d2, _ = await broker.call(
        "D2", "GET", "/Users", params={"filter": 'externalId eq "d1-emp-7"'}
    )
    assert none_for_d2["totalResults"] == 0


async def test_group_members_are_translated_in_writes_reads_filters_and_patches(
    broker: Broker, home: Home
) -> None:
    ids = []
    for _ in range(3):
        status, user, _ = await broker.call("D1", "POST", "/Users", new_user())
        assert status == 201
        ids.append(user["id"])
    status, group, _ = await broker.call(
        "D1",
        "POST",
        "/Groups",
        {
            "schemas": [CORE_GROUP],
            "displayName": unique("grp"),
            "members": [
                {"value": ids[0], "type": "User"},
                {"value": ids[1], "$ref": f"{broker.base}/Users/{ids[1]}"},
            ],
        },
    )
    assert status == 201, group
    assert sorted(m["value"] for m in group["members"]) == sorted(ids[:2])
    assert all(
        m["$ref"] == f"{broker.base}/Users/{m['value']}" for m in group["members"] if "$ref" in m
    )
    # Home holds internal IDs.
    _, at_home = home.call("GET", f'/Groups?filter=displayName eq "{group["displayName"]}"')
    home_members = {m["value"] for m in at_home["Resources"][0]["members"]}
    assert home_members.isdisjoint(ids) and all(HOME_ID.fullmatch(v) for v in home_members)
    # Filter by member, in a value path.
    status, found, _ = await broker.call(
        "D1", "GET", "/Groups", params={"filter": f'members[value eq "{ids[1]}"]'}
    )
    assert status == 200 and [g["id"] for g in found["Resources"]] == [group["id"]]
    # PATCH: add the third member, remove the first by a value filter.
    patch = {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [
            {"op": "add", "path": "members", "value": [{"value": ids[2]}]},
            {"op": "remove", "path": f'members[value eq "{ids[0]}"]'},
        ],
    }
    status, _, _ = await broker.call("D1", "PATCH", f"/Groups/{group['id']}", patch)
    assert status in (200, 204)
    _, after, _ = await broker.call("D1", "GET", f"/Groups/{group['id']}")
    assert sorted(m["value"] for m in after["members"]) == sorted(ids[1:])
    # D2 sees the same group with its own IDs for group and members.
    _, d2_view, _ = await broker.call(
        "D2", "GET", "/Groups", params={"filter": f'displayName eq "{group["displayName"]}"'}
    )
    d2_group = d2_view["Resources"][0]
    assert d2_group["id"] != group["id"]
    assert {m["value"] for m in d2_group["members"]}.isdisjoint(ids)


async def test_unknown_member_in_a_write_is_invalid_value_and_changes_nothing(
    broker: Broker, home: Home
) -> None:
    name = unique("grp")
    status, body, _ = await broker.call(
        "D1",
        "POST",
        "/Groups",
        {"schemas": [CORE_GROUP], "displayName": name, "members": [{"value": "not-mine"}]},
    )
    assert (status, body["scimType"]) == (400, "invalidValue")
    assert "not-mine" in body["detail"]
    _, at_home = home.call("GET", f'/Groups?filter=displayName eq "{name}"')
    assert at_home["totalResults"] == 0


async def test_unknown_ids_in_filters_match_nothing(broker: Broker, home: Home) -> None:
    user = home_create(home, "/Users", new_user())
    for filter_text in (
        f'id eq "{user["id"]}"',
        'id eq "whatever"',
        f'members[value eq "{user["id"]}"]',
    ):
        endpoint = "/Groups" if "members" in filter_text else "/Users"
        status, body, _ = await broker.call("D1", "GET", endpoint, params={"filter": filter_text})
        assert status == 200 and body["totalResults"] == 0, filter_text


async def test_put_and_delete_through_the_broker(broker: Broker, home: Home) -> None:
    _, user, _ = await broker.call("D1", "POST", "/Users", new_user(displayName="Before"))
    status, replaced, _ = await broker.call(
        "D1",
        "PUT",
        f"/Users/{user['id']}",
        {**new_user(user["userName"]), "displayName": "After", "id": "ignored"},
    )
    assert status == 200 and replaced["displayName"] == "After" and replaced["id"] == user["id"]
    status, _, _ = await broker.call("D1", "DELETE", f"/Users/{user['id']}")
    assert status == 204
    status, body, _ = await broker.call("D1", "GET", f"/Users/{user['id']}")
    assert (status, body["detail"]) == (404, "resource not found")


async def test_custom_extension_reference_attributes_both_ways(broker: Broker, home: Home) -> None:
    _, sponsor, _ = await broker.call("D1", "POST", "/Users", new_user())
    _, buddy, _ = await broker.call("D1", "POST", "/Users", new_user())
    status, user, _ = await broker.call(
        "D1",
        "POST",
        "/Users",
        new_user(
            schemas=["urn:ietf:params:scim:schemas:core:2.0:User", ACME],
            **{
                ACME: {
                    "costCenter": "42",
                    "sponsor": {"value": sponsor["id"]},
                    "buddy": f"{broker.base}/Users/{buddy['id']}",
                }
            },
        ),
    )
    assert status == 201, user
    assert user[ACME]["sponsor"]["value"] == sponsor["id"]
    assert user[ACME]["buddy"] == f"{broker.base}/Users/{buddy['id']}"
    _, at_home = home.call("GET", f'/Users?filter=userName eq "{user["userName"]}"')
    home_ext = at_home["Resources"][0][ACME]
    assert HOME_ID.fullmatch(home_ext["sponsor"]["value"])
    assert home_ext["buddy"].startswith(home.url + "/Users/")
    status, found, _ = await broker.call(
        "D1", "GET", "/Users", params={"filter": f'{ACME}:sponsor.value eq "{sponsor["id"]}"'}
    )
    assert [u["id"] for u in found["Resources"]] == [user["id"]]


async def test_if_none_match_with_the_current_version_is_304(broker: Broker, home: Home) -> None:
    _, user, _ = await broker.call("D1", "POST", "/Users", new_user())
    status, _, headers = await broker.call("D1", "GET", f"/Users/{user['id']}")
    assert status == 200
    status, body, again = await broker.call(
        "D1", "GET", f"/Users/{user['id']}", headers={"If-None-Match": headers["ETag"]}
    )
    assert (status, body, again["ETag"]) == (304, None, headers["ETag"])
    status, _, _ = await broker.call(
        "D1", "GET", f"/Users/{user['id']}", headers={"If-None-Match": 'W/"0"'}
    )
    assert status == 200
