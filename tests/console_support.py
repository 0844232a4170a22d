"""Helpers for the console's tests: a signed-in HTTP session against the admin listener."""

from __future__ import annotations

import re

import aiohttp

from broker.app import POOL
from broker.tokens import TokenStore
from tests.scim_support import Broker

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "the page has a form with a CSRF token"
    return found.group(1)


async def operator_token(broker: Broker, scopes: list[str] | None = None) -> str:
    token, _ = await TokenStore(broker.app[POOL]).issue("H", scopes=scopes or ["admin"])
    return token


def client() -> aiohttp.ClientSession:
    """A client that keeps the console's cookies (the admin listener is at 127.0.0.1)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(session: aiohttp.ClientSession, broker: Broker, token: str) -> str:
    """Signs ``session`` in with ``token``; the session's CSRF token."""
    async with session.get(f"{broker.admin_url}/console/signin") as response:
        assert response.status == 200
        pre = csrf_of(await response.text())
    async with session.post(
        f"{broker.admin_url}/console/signin",
        data={"token": token, "csrf": pre, "next": "/console/"},
    ) as response:
        assert response.status == 200, await response.text()
        assert str(response.url).endswith("/console/")
        return csrf_of(await response.text())
