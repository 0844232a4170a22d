"""DESIGN section 7: bad input gets a SCIM error with the right status and scimType, and changes nothing."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from broker.tokens import TokenStore
from tests.scim_support import CORE_GROUP, Broker, Home, new_user, start_broker, unique

ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"


@pytest.fixture
async def broker(db_url: str, home: Home) -> AsyncIterator[Broker]:
    async for running in start_broker(
        db_url, home, {"D1": {}, "P": {"push": True, "scim_url": "http://peer.invalid/scim/v2"}}
    ):
        yield running


async def raw(
    broker: Broker,
    method: str,
    path: str,
    *,
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Any]:
    response = await broker.client.request(
        method,
        "/scim/v2" + path,
        data=data,
        headers=broker.auth("D1") if headers is None else headers,
    )
    text = await response.text()
    return response.status, json.loads(text), response


def assert_error(
    status: int, body: dict[str, Any], expected_status: int, scim_type: str | None
) -> None:
    assert status == expected_status, body
    assert body["schemas"] == [ERROR]
    assert body["status"] == str(expected_status)
    assert body.get("scimType") == scim_type
    assert body["detail"]


async def users_named(home: Home, name: str) -> int:
    _, found = home.call("GET", f'/Users?filter=userName eq "{name}"')
    return int(found["totalResults"])


async def test_malformed_json_is_invalid_syntax_and_creates_nothing(
    broker: Broker, home: Home
) -> None:
    status, body, _ = await raw(broker, "POST", "/Users", data='{"userName": "x",')
    assert_error(status, body, 400, "invalidSyntax")
    assert "not valid JSON" in body["detail"]


async def test_a_body_that_is_not_a_resource_is_invalid_syntax(broker: Broker) -> None:
    status, body, _ = await raw(broker, "POST", "/Users", data="[1, 2]")
    assert_error(status, body, 400, "invalidSyntax")


async def test_a_wrong_content_type_is_415(broker: Broker, home: Home) -> None:
    name = unique()
    headers = {**broker.auth("D1"), "Content-Type": "text/plain"}
    status, body, _ = await raw(
        broker, "POST", "/Users", data=json.dumps(new_user(name)), headers=headers
    )
    assert_error(status, body, 415, None)
    assert "application/scim+json" in body["detail"]
    assert await users_named(home, name) == 0


async def test_an_oversized_body_is_413(broker: Broker) -> None:
    huge = io.BytesIO(json.dumps(new_user(nickName="x" * (2 * 1024 * 1024))).encode())
    status, body, _ = await raw(broker, "POST", "/Users", data=huge)
    assert_error(status, body, 413, None)


async def test_a_filter_nested_too_deep_is_invalid_filter(broker: Broker) -> None:
    deep = "not (" * 40 + 'userName eq "x"' + ")" * 40
    status, body, _ = await raw(broker, "GET", f"/Users?filter={deep}")
    assert_error(status, body, 400, "invalidFilter")
    assert "nests more than 32" in body["detail"]


async def test_a_malformed_filter_is_invalid_filter(broker: Broker) -> None:
    status, body, _ = await raw(broker, "GET", "/Users?filter=userName eq")
    assert_error(status, body, 400, "invalidFilter")


async def test_probing_ids_with_ordering_operators_is_refused(broker: Broker) -> None:
    status, body, _ = await raw(broker, "GET", '/Users?filter=id sw "a"')
    assert_error(status, body, 400, "invalidFilter")


async def test_an_unknown_attribute_in_a_filter_is_home_s_invalid_filter(broker: Broker) -> None:
    status, body, _ = await raw(broker, "GET", '/Users?filter=noSuchAttribute eq "x"')
    assert_error(status, body, 400, "invalidFilter")


async def test_invalid_patch_is_refused_and_changes_nothing(broker: Broker) -> None:
    status, user, _ = await broker.call("D1", "POST", "/Users", new_user(displayName="Same"))
    assert status == 201
    bad = {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "move", "path": "displayName", "value": "x"}],
    }
    status, body, _ = await broker.call("D1", "PATCH", f"/Users/{user['id']}", bad)
    assert_error(status, body, 400, "invalidValue")
    _, after, _ = await broker.call("D1", "GET", f"/Users/{user['id']}")
    assert after["displayName"] == "Same"


async def test_a_duplicate_user_name_is_409_uniqueness(broker: Broker) -> None:
    name = unique()
    assert (await broker.call("D1", "POST", "/Users", new_user(name)))[0] == 201
    status, body, _ = await broker.call("D1", "POST", "/Users", new_user(name))
    assert_error(status, body, 409, "uniqueness")


@pytest.mark.parametrize(
    ("header", "message"),
    [(None, "Bearer TOKEN"), ("Bearer bkr_wrong", "not known"), ("Basic eDp5", "Bearer TOKEN")],
)
async def test_missing_and_wrong_tokens_are_401_with_www_authenticate(
    broker: Broker, header: str | None, message: str
) -> None:
    headers = {"Authorization": header} if header else {}
    status, body, response = await raw(broker, "GET", "/Users", headers=headers)
    assert_error(status, body, 401, None)
    assert message in body["detail"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_expired_and_revoked_tokens_are_401(broker: Broker) -> None:
    tokens = TokenStore(broker.pool)
    expired, _ = await tokens.issue("D1", expires_in=timedelta(seconds=-1))
    revoked, info = await tokens.issue("D1")
    await tokens.revoke(info.id)
    for token, message in ((expired, "expired"), (revoked, "revoked")):
        status, body, _ = await raw(
            broker, "GET", "/Users", headers={"Authorization": f"Bearer {token}"}
        )
        assert_error(status, body, 401, None)
        assert message in body["detail"]


async def test_a_read_only_token_cannot_write(broker: Broker, home: Home) -> None:
    token, _ = await TokenStore(broker.pool).issue("D1", scopes=["scim:read"])
    name = unique()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"}
    status, body, _ = await raw(
        broker, "POST", "/Users", data=json.dumps(new_user(name)), headers=headers
    )
    assert_error(status, body, 403, None)
    assert "scim:write" in body["detail"]
    assert await users_named(home, name) == 0


async def test_a_push_domain_cannot_create_through_the_proxy(broker: Broker) -> None:
    status, body, _ = await broker.call(
        "P", "POST", "/Groups", {"schemas": [CORE_GROUP], "displayName": unique()}
    )
    assert_error(status, body, 403, None)
    assert "push domain" in body["detail"]


async def test_unknown_endpoints_and_methods_are_scim_errors(broker: Broker) -> None:
    status, body, _ = await raw(broker, "GET", "/Widgets")
    assert_error(status, body, 404, None)
    status, body, _ = await raw(broker, "POST", "/Bulk", data="{}")
    assert_error(status, body, 400, "invalidValue")
    status, body, _ = await raw(broker, "PUT", "/Users")
    assert_error(status, body, 405, None)


async def test_a_stale_if_match_is_home_s_412_as_a_scim_error(broker: Broker, home: Home) -> None:
    status, user, _ = await broker.call("D1", "POST", "/Users", new_user())
    stale = {"If-Match": 'W/"0"'}
    status, body, _ = await broker.call(
        "D1", "PUT", f"/Users/{user['id']}", new_user(user["userName"]), headers=stale
    )
    assert status == 412, body
    assert body["schemas"] == [ERROR]


async def test_sorting_by_id_is_refused_since_it_would_order_internal_ids(broker: Broker) -> None:
    status, body, _ = await raw(broker, "GET", "/Users?sortBy=id")
    assert_error(status, body, 400, "invalidValue")
