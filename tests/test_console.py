"""The console over plain HTTP: who gets in (a session from an operator token, never a peer's),
CSRF on every POST, tokens shown once, the cookie's attributes, message pages instead of
internal errors, and nothing of it on the port domains reach."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker.app import POOL
from tests.console_support import client, csrf_of, operator_token, sign_in
from tests.scim_support import Broker, Home, new_user, start_broker


@pytest.fixture
async def broker(db_url: str, home: Home) -> AsyncIterator[Broker]:
    async for running in start_broker(db_url, home, {"H": {"kind": "home"}, "D": {}}):
        yield running


async def _token_count(broker: Broker) -> int:
    return int(await broker.app[POOL].fetchval("SELECT count(*) FROM domain_tokens"))


async def test_a_page_without_a_session_sends_to_sign_in_and_a_post_is_refused(
    broker: Broker,
) -> None:
    async with client() as http:
        async with http.get(
            f"{broker.admin_url}/console/deliveries", allow_redirects=False
        ) as response:
            assert response.status == 303
            assert response.headers["Location"].startswith("/console/signin?next=")
        before = await _token_count(broker)
        async with http.post(
            f"{broker.admin_url}/console/domains/tokens",
            data={"domain": "D", "csrf": "anything"},
        ) as response:
            assert response.status == 401
            assert "sign in first" in await response.text()
        assert await _token_count(broker) == before


async def test_a_post_with_a_bad_csrf_token_is_refused_and_changes_nothing(
    broker: Broker,
) -> None:
    async with client() as http:
        csrf = await sign_in(http, broker, await operator_token(broker))
        before = await _token_count(broker)
        for wrong in ("", "x" * 43, csrf[:-1]):
            async with http.post(
                f"{broker.admin_url}/console/domains/tokens", data={"domain": "D", "csrf": wrong}
            ) as response:
                assert response.status == 403
                assert "CSRF" in await response.text()
        assert await _token_count(broker) == before
        async with http.post(
            f"{broker.admin_url}/console/domains/tokens", data={"domain": "D", "csrf": csrf}
        ) as response:
            assert response.status == 201
        assert await _token_count(broker) == before + 1


async def test_a_new_token_is_shown_once_and_its_issue_is_audited_with_the_console_token(
    broker: Broker,
) -> None:
    async with client() as http:
        csrf = await sign_in(http, broker, await operator_token(broker))
        async with http.post(
            f"{broker.admin_url}/console/domains/tokens",
            data={"domain": "D", "csrf": csrf, "scopes": "scim:read", "expires": "1d"},
        ) as response:
            page = await response.text()
        new = page.split('<output id="new-token">')[1].split("</output>")[0]
        assert new.startswith("bkr_")
        for path in ("/console/domains", "/console/audit", "/console/"):
            async with http.get(f"{broker.admin_url}{path}") as response:
                assert response.status == 200
                assert new not in await response.text(), path
    row = await broker.app[POOL].fetchrow(
        "SELECT actor, details FROM audit_log WHERE action = 'token_issue' AND subject = 'D' "
        "ORDER BY seq DESC LIMIT 1"
    )
    assert row["actor"].startswith("H token ")
    assert new not in str(row["details"])


async def test_the_session_cookie_is_httponly_strict_and_ends_at_sign_out(broker: Broker) -> None:
    async with client() as http:
        csrf = await sign_in(http, broker, await operator_token(broker))
        (cookie,) = [m for m in http.cookie_jar if m.key == "broker_console"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict"
        assert cookie["path"] == "/console"
        assert not cookie["secure"], "public_url is http here"
        stolen = cookie.value
        async with http.post(
            f"{broker.admin_url}/console/signout", data={"csrf": csrf}
        ) as response:
            assert str(response.url).endswith("/console/signin")
    async with (
        client() as other,
        other.get(
            f"{broker.admin_url}/console/",
            cookies={"broker_console": stolen},
            allow_redirects=False,
        ) as response,
    ):
        assert response.status == 303, "a signed-out session opens nothing"


async def test_a_revoked_token_ends_its_sessions(broker: Broker) -> None:
    token = await operator_token(broker)
    async with client() as http:
        await sign_in(http, broker, token)
        token_id = await broker.app[POOL].fetchval(
            "SELECT token_id FROM console_sessions ORDER BY created_at DESC LIMIT 1"
        )
        await broker.app[POOL].execute(
            "UPDATE domain_tokens SET revoked_at = now() WHERE id = $1", token_id
        )
        async with http.get(f"{broker.admin_url}/console/", allow_redirects=False) as response:
            assert response.status == 303


async def test_a_peer_token_opens_nothing_and_a_read_only_token_changes_nothing(
    broker: Broker,
) -> None:
    async with client() as http:
        async with http.get(f"{broker.admin_url}/console/signin") as response:
            pre = csrf_of(await response.text())
        async with http.post(
            f"{broker.admin_url}/console/signin",
            data={"token": broker.tokens["D"], "csrf": pre},
            allow_redirects=False,
        ) as response:
            assert response.status == 403
            page = await response.text()
            assert broker.tokens["D"] not in page, "a token is never rendered back"
        csrf = await sign_in(http, broker, await operator_token(broker, ["console:read"]))
        before = await _token_count(broker)
        async with http.post(
            f"{broker.admin_url}/console/domains/tokens", data={"domain": "D", "csrf": csrf}
        ) as response:
            assert response.status == 403
            assert "read-only" in await response.text()
        assert await _token_count(broker) == before


async def test_a_failure_is_a_message_page_never_a_trace(broker: Broker) -> None:
    async with client() as http:
        await sign_in(http, broker, await operator_token(broker))
        async with http.get(f"{broker.admin_url}/console/audit?since=yesterday") as response:
            assert response.status == 400
            assert "invalidValue" in await response.text()
        async with http.get(f"{broker.admin_url}/console/no-such-page") as response:
            assert response.status == 404
            assert "no such page" in await response.text()
        await broker.app[POOL].execute("ALTER TABLE audit_log RENAME TO audit_log_away")
        try:
            async with http.get(f"{broker.admin_url}/console/audit") as response:
                assert response.status == 500
                page = await response.text()
        finally:
            await broker.app[POOL].execute("ALTER TABLE audit_log_away RENAME TO audit_log")
        assert "correlation ID" in page
        assert "Traceback" not in page and "audit_log" not in page
        assert response.headers["Content-Type"].startswith("text/html")


async def test_the_console_is_not_served_to_domains(broker: Broker) -> None:
    status, user, _ = await broker.call("D", "POST", "/Users", new_user())
    assert status == 201, user  # an entity the console would show, with its internal ID
    for path in ("/console/", "/console/signin", "/console/static/console.css"):
        response = await broker.client.get(path)
        assert response.status == 404, path
