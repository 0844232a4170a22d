"""/Bulk through the broker (RFC 7644 section 3.7): paths, bodies, bulkId references, locations."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.scim_support import CORE_GROUP, HOME_ID, Broker, Home, new_user, start_broker, unique

BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


@pytest.fixture
async def broker(db_url: str, home: Home) -> AsyncIterator[Broker]:
    async for running in start_broker(db_url, home, {"D1": {}, "D2": {}}):
        yield running


async def test_bulk_creates_with_bulk_id_references_and_answers_with_the_domains_ids(
    broker: Broker, home: Home
) -> None:
    _, existing, _ = await broker.call("D1", "POST", "/Users", new_user())
    name = unique("bulk-group")
    request = {
        "schemas": [BULK],
        "Operations": [
            {
                "method": "POST",
                "path": "/Users",
                "bulkId": "alice",
                "data": new_user(externalId="hr-1"),
            },
            {
                "method": "POST",
                "path": "/Groups",
                "bulkId": "team",
                "data": {
                    "schemas": [CORE_GROUP],
                    "displayName": name,
                    "members": [{"value": "bulkId:alice"}, {"value": existing["id"]}],
                },
            },
            {
                "method": "PATCH",
                "path": f"/Users/{existing['id']}",
                "data": {
                    "schemas": [PATCH_OP],
                    "Operations": [{"op": "replace", "path": "displayName", "value": "Bulked"}],
                },
            },
            {"method": "DELETE", "path": "/Users/not-a-known-id"},
            {
                "method": "POST",
                "path": "/Groups",
                "bulkId": "bad",
                "data": {
                    "schemas": [CORE_GROUP],
                    "displayName": unique(),
                    "members": [{"value": "stranger"}],
                },
            },
        ],
    }
    status, body, _ = await broker.call("D1", "POST", "/Bulk", request)
    assert status == 200, body
    results = body["Operations"]
    assert [r["status"] for r in results] == ["201", "201", "200", "404", "400"]
    assert results[3]["response"]["detail"] == "resource not found"
    assert results[4]["response"]["scimType"] == "invalidValue"
    alice_location, team_location = results[0]["location"], results[1]["location"]
    assert alice_location.startswith(f"{broker.base}/Users/") and team_location.startswith(
        f"{broker.base}/Groups/"
    )
    assert not HOME_ID.search(alice_location + team_location)
    alice_id = alice_location.rsplit("/", 1)[1]
    _, team, _ = await broker.call("D1", "GET", "/Groups/" + team_location.rsplit("/", 1)[1])
    assert sorted(m["value"] for m in team["members"]) == sorted([alice_id, existing["id"]])
    _, alice, _ = await broker.call("D1", "GET", f"/Users/{alice_id}")
    assert alice["externalId"] == "hr-1"
    _, patched, _ = await broker.call("D1", "GET", f"/Users/{existing['id']}")
    assert patched["displayName"] == "Bulked"
    # Home holds the group with internal member IDs only.
    _, at_home = home.call("GET", f'/Groups?filter=displayName eq "{name}"')
    assert all(HOME_ID.fullmatch(m["value"]) for m in at_home["Resources"][0]["members"])


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"Operations": []}, "in schemas"),
        ({"schemas": [BULK], "Operations": []}, "non-empty"),
        (
            {"schemas": [BULK], "Operations": [{"method": "GET", "path": "/Users"}]},
            "POST, PUT, PATCH or DELETE",
        ),
        (
            {"schemas": [BULK], "Operations": [{"method": "POST", "path": "/Users", "data": {}}]},
            "needs a bulkId",
        ),
        (
            {"schemas": [BULK], "Operations": [{"method": "DELETE", "path": "/Widgets/1"}]},
            "not a resource endpoint",
        ),
    ],
)
async def test_malformed_bulk_requests_are_refused_whole(
    broker: Broker, request_body: dict, message: str
) -> None:
    status, body, _ = await broker.call("D1", "POST", "/Bulk", request_body)
    assert status == 400 and message in body["detail"]
