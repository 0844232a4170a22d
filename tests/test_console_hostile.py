"""The console attacked from a browser an attacker's page may drive, and by token holders who
should not get in: sign-in redirect targets, cross-site and session-less POSTs, GETs that
would change state, a planted session cookie, markup a domain wrote into home, framing and
caching headers. A real broker and a real home (scim2-server)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker.app import POOL
from broker.console.shell import safe_next
from tests.console_support import client, csrf_of, operator_token, sign_in
from tests.scim_support import Broker, Home, new_user, start_broker


def test_a_sign_in_target_with_a_control_character_goes_to_the_overview() -> None:
    for bad in ("/console/x\r\nSet-Cookie: a=b", "/console/\t/evil", "/console/\x00"):
        assert safe_next(bad) == "/console/"
    for bad in ("//evil.example/", "https://evil.example/console/", "/console\\..\\x", "/x"):
        assert safe_next(bad) == "/console/"
    assert safe_next("/console/identity?q=a%0d") == "/console/identity?q=a%0d"


@pytest.fixture
async def broker(db_url: str, home: Home) -> AsyncIterator[Broker]:
    async for running in start_broker(db_url, home, {"H": {"kind": "home"}, "D": {}}):
        yield running


async def test_a_newline_in_next_is_no_internal_error_and_no_header(broker: Broker) -> None:
    token = await operator_token(broker)
    async with client() as http:
        async with http.get(f"{broker.admin_url}/console/signin") as response:
            pre = csrf_of(await response.text())
        async with http.post(
            f"{broker.admin_url}/console/signin",
            data={"token": token, "csrf": pre, "next": "/console/x\r\nSet-Cookie: evil=1"},
            allow_redirects=False,
        ) as response:
            assert response.status == 303, await response.text()
            assert response.headers["Location"] == "/console/"
            assert "evil" not in response.cookies


async def test_a_planted_cookie_is_replaced_and_cross_site_posts_change_nothing(
    broker: Broker,
) -> None:
    token = await operator_token(broker)
    tokens_before = await broker.app[POOL].fetchval("SELECT count(*) FROM domain_tokens")
    async with client() as http:
        http.cookie_jar.update_cookies({"broker_console": "planted-by-the-attacker"})
        csrf = await sign_in(http, broker, token)
        cookies = {c.key: c.value for c in http.cookie_jar}
        assert cookies["broker_console"] != "planted-by-the-attacker"
        for csrf_given in (None, "", "x" * 43, csrf + "x"):
            data = {"domain": "D"} if csrf_given is None else {"domain": "D", "csrf": csrf_given}
            async with http.post(f"{broker.admin_url}/console/domains/tokens", data=data) as r:
                assert r.status == 403
        for path in ("/console/signout", "/console/domains/tokens", "/console/merge"):
            async with http.get(f"{broker.admin_url}{path}", allow_redirects=False) as r:
                assert r.status in (200, 405), path  # a GET shows or refuses; never acts
        async with http.get(f"{broker.admin_url}/console/") as r:
            assert r.status == 200 and "Sign out" in await r.text()  # still signed in
    async with client() as other:  # another session's CSRF token is not this one's
        other_csrf = await sign_in(other, broker, await operator_token(broker))
        assert other_csrf != csrf
    async with client() as http:
        await sign_in(http, broker, token)
        async with http.post(
            f"{broker.admin_url}/console/domains/tokens", data={"domain": "D", "csrf": other_csrf}
        ) as r:
            assert r.status == 403
    assert (
        await broker.app[POOL].fetchval("SELECT count(*) FROM domain_tokens") == tokens_before + 1
    )  # only the other operator's token, which this test issued itself


async def test_markup_a_domain_wrote_into_home_is_shown_as_text(broker: Broker) -> None:
    evil = '<img src=x onerror="alert(1)">'
    status, created, _ = await broker.call(
        "D", "POST", "/Users", new_user(userName=f"u{evil}", displayName=evil)
    )
    assert status == 201, created
    async with client() as http:
        await sign_in(http, broker, await operator_token(broker))
        async with http.get(
            f"{broker.admin_url}/console/identity", params={"q": f"D:{created['id']}"}
        ) as response:
            html = await response.text()
            assert response.status == 200
            assert "onerror" in html and evil not in html  # shown, escaped
            assert response.headers["X-Frame-Options"] == "DENY"
            assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
            assert response.headers["Cache-Control"] == "no-store"
