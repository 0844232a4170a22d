"""Outbound calls (home, push peers, SET receivers): a redirect is never followed, and the
addresses the broker calls are checked wherever they enter and again at start (DESIGN section 8).

A redirecting server here is a real aiohttp server answering 3xx towards a second real server
that records whatever reaches it: it must get nothing, no body, no password, no credential."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.app import create_app
from broker.config import (
    Config,
    ConfigError,
    DatabaseConfig,
    HomeConfig,
    PropagationConfig,
    ServerConfig,
    load_config,
)
from broker.domains import DomainStore
from broker.errors import InvalidValueError
from broker.home import HomeClient, HomeUnavailable
from broker.http import exchange, is_redirect, outbound_url_problem
from broker.propagation.peer import PeerClient
from broker.propagation.policy import Failure, Verdict, judge
from tests.propagation_support import FAST, cli, federation, home_tool
from tests.scim_support import Broker, Home, _free_port, new_user, unique

PASSWORD = "correct horse battery staple"


@dataclass
class Redirect:
    """A server answering every request with ``status`` towards ``target``'s same path."""

    url: str
    """The redirecting server's base URL."""
    received: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    """What reached the target: method, path, headers, body."""
    redirected: list[str] = field(default_factory=list)
    """The requests the redirecting server answered."""


@asynccontextmanager
async def redirecting(status: int = 307) -> AsyncIterator[Redirect]:
    # Each server binds port 0 and says which port it got: a port found free and bound later
    # can be taken meanwhile (CI saw a client's socket take one).
    redirect = Redirect("")
    target: list[int] = []

    async def record(request: web.Request) -> web.Response:
        redirect.received.append(
            (request.method, request.path_qs, dict(request.headers), await request.read())
        )
        return web.json_response({"id": "taken"}, status=201)

    async def bounce(request: web.Request) -> web.Response:
        redirect.redirected.append(f"{request.method} {request.path_qs}")
        location = f"http://127.0.0.1:{target[0]}{request.path_qs}"
        return web.Response(status=status, headers={"Location": location})

    runners = []
    try:
        for handler in (record, bounce):
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler)
            runner = web.AppRunner(app)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            target.append(runner.addresses[0][1])
        redirect.url = f"http://127.0.0.1:{target[1]}/v2"
        yield redirect
    finally:
        for runner in runners:
            await runner.cleanup()


# --------------------------------------------------------------------------- never followed


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_the_shared_exchange_never_follows_a_redirect(status: int) -> None:
    async with redirecting(status) as redirect, aiohttp.ClientSession() as session:
        answer = await exchange(
            session,
            "POST",
            redirect.url + "/Users",
            auth={"Authorization": "Bearer peer-secret"},
            body={"userName": "pat", "password": PASSWORD},
        )
    assert answer.status == status
    assert redirect.redirected == ["POST /v2/Users"]
    assert redirect.received == [], "the redirect target got nothing"


async def test_the_home_client_refuses_a_redirect_and_sends_nothing_on() -> None:
    async with redirecting() as redirect, HomeClient(redirect.url, "home-secret") as home:
        with pytest.raises(HomeUnavailable, match="redirect"):
            await home.request("POST", "/Users", body={"userName": "pat", "password": PASSWORD})
        with pytest.raises(HomeUnavailable, match="redirect"):
            await home.forward("PUT", "/Users/x", {}, b'{"password": "p"}')
    assert redirect.received == []


async def test_a_peer_answering_with_a_redirect_is_a_permanent_failure_naming_the_fix() -> None:
    async with redirecting() as redirect, aiohttp.ClientSession() as session:
        peer = PeerClient(session, redirect.url, "peer-secret", domain="P1")
        with pytest.raises(Failure) as caught:
            await peer.call("POST", "/Users", body={"userName": "pat", "password": PASSWORD})
    failure = caught.value
    assert failure.verdict is Verdict.PERMANENT
    assert failure.status == 307
    assert "redirect" in failure.reason and "--scim-url" in failure.reason
    assert redirect.received == []


def test_a_redirect_is_judged_permanent_and_304_is_not_a_redirect() -> None:
    failure = judge(308, None, {"Location": "https://elsewhere.example/scim"}, "POST /Users")
    assert failure.verdict is Verdict.PERMANENT
    assert "https://elsewhere.example/scim" in failure.reason
    assert "never follows redirects" in failure.reason
    assert [s for s in range(200, 600) if is_redirect(s)] == [
        300,
        301,
        302,
        303,
        305,
        306,
        307,
        308,
        *range(309, 400),
    ]


async def _dead_letter(broker: Broker, domain: str, within: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        record = await broker.pool.fetchrow(
            "SELECT id, kind, last_error FROM outbox WHERE domain_id = $1 AND state = 'dead'",
            domain,
        )
        if record is not None:
            return dict(record)
        assert time.monotonic() < deadline, "no dead letter"
        await asyncio.sleep(0.05)


async def test_a_push_peer_answering_307_gets_no_create_resent_and_a_person_is_told(
    db_url: str, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack: a push peer answers 307 pointing elsewhere, hoping the broker re-sends the
    create (password and all) there. It does not: the delivery is a dead letter whose reason
    says what to fix, and the other address gets nothing."""
    async with redirecting() as redirect:
        async for broker in federation(db_url, home, {"P1": redirect.url}, monkeypatch, "tok"):
            status, _ = await home_tool(
                broker, "POST", "/Users", new_user(unique("pat"), password=PASSWORD)
            )
            assert status == 201
            dead = await _dead_letter(broker, "P1")
            assert redirect.redirected, "the peer was called"
            assert "redirect" in dead["last_error"]["reason"]
            assert "--scim-url" in dead["last_error"]["reason"]
            assert dead["last_error"]["verdict"] == "permanent"
    assert redirect.received == [], "nothing reached the address the peer pointed at"


async def test_a_set_receiver_answering_307_gets_no_set_resent(
    db_url: str, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with redirecting() as redirect:
        async for broker in federation(db_url, home, {}, monkeypatch, "tok", FAST):
            code, out = await cli(
                db_url, "events", "subscribe", "D", "--delivery", "push",
                "--endpoint", redirect.url + "/events",
            )  # fmt: skip
            assert code == 0, out
            await home_tool(broker, "POST", "/Users", new_user(unique("ev")))
            dead = await _dead_letter(broker, "D")
            assert "redirect" in dead["last_error"]["reason"]
            assert redirect.redirected == ["POST /v2/events"]
    assert redirect.received == []


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://scim.example.org/scim/v2", None),
        ("http://127.0.0.1:8080/v2", None),
        ("https://[::1]:8443/scim", None),
        ("ftp://scim.example.org/v2", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("scim.example.org/v2", "http:// or https://"),
        ("https:///v2", "no host"),
        ("https://user:pw@scim.example.org/v2", "user or password"),
        ("https://token@scim.example.org/v2", "user or password"),
        ("https://scim.example.org/v2#frag", "fragment"),
        ("https://scim.example.org/v2?x=1", "?query"),
        ("https://scim.example.org:99999/v2", "not a URL"),
        ("https://scim.example.org/v 2", "whitespace"),
        ("https://scim.example.org/v2\x00", "control character"),
        ("", "empty"),
    ],
)
def test_an_outbound_url_is_http_with_a_host_and_nothing_else(
    url: str, problem: str | None
) -> None:
    found = outbound_url_problem(url)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_a_set_receiver_may_have_a_query_but_no_fragment() -> None:
    assert outbound_url_problem("https://r.example/events?tenant=7", query=True) is None
    assert outbound_url_problem("https://r.example/events#x", query=True) is not None


async def test_a_domain_with_a_bad_scim_url_is_refused_with_what_to_fix(
    pool: asyncpg.Pool,
) -> None:
    store = DomainStore(pool)
    with pytest.raises(InvalidValueError, match=r"P1 must not carry a user or password"):
        await store.add("P1", scim_url="https://u:p@peer.example/v2", push=True)
    assert await store.list() == []
    await store.add("P1", scim_url="https://peer.example/v2", push=True)
    with pytest.raises(InvalidValueError, match="http:// or https://"):
        await store.set_scim_url("P1", "gopher://peer.example/v2")
    assert (await store.get("P1")).scim_url == "https://peer.example/v2"
    moved = await store.set_scim_url("P1", "https://new.peer.example/v2")
    assert moved.scim_url == "https://new.peer.example/v2"


async def test_the_cli_refuses_bad_peer_and_receiver_urls(db_url: str) -> None:
    code, out = await cli(
        db_url, "domain", "add", "P1", "--push", "--scim-url", "https://peer.example/v2#x"
    )
    assert code == 1 and "fragment" in out and "P1" in out, out
    code, out = await cli(db_url, "domain", "add", "D")
    assert code == 0, out
    code, out = await cli(
        db_url, "events", "subscribe", "D", "--delivery", "push",
        "--endpoint", "https://admin:pw@receiver.example/events",
    )  # fmt: skip
    assert code == 1 and "--token-env" in out, out


def test_the_home_scim_url_is_checked_by_the_configuration_naming_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"BROKER_HOME__SCIM_URL": "https://u:p@idm.example/scim/v2"})
    assert "home.scim_url (env BROKER_HOME__SCIM_URL)" in str(caught.value)
    assert "user or password" in str(caught.value)
    with pytest.raises(ConfigError, match=r"events\.home_jwks_url"):
        load_config(environ={"BROKER_EVENTS__HOME_JWKS_URL": "file:///etc/jwks.json"})
    assert HomeConfig(scim_url="https://idm.example/scim/v2/").scim_url == (
        "https://idm.example/scim/v2"
    )


async def _store_bad_urls(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        # Written before the broker checked them (or by hand): the broker must not start.
        await conn.execute(
            "INSERT INTO domains (id, kind, scim_url, push) "
            "VALUES ('P9', 'peer', 'https://u:p@peer.example/v2', true)"
        )
    finally:
        await conn.close()


async def test_the_broker_does_not_start_with_a_bad_stored_url(db_url: str) -> None:
    await _store_bad_urls(db_url)
    config = Config(
        server=ServerConfig(admin_port=0),
        database=DatabaseConfig(url=db_url),
        home=HomeConfig(scim_url="http://127.0.0.1:9/scim/v2"),
        propagation=PropagationConfig(enabled=False, secret_key_env="TEST_BROKER_KEY"),
    )
    with pytest.raises(ConfigError) as caught:
        async with TestServer(create_app(config)):
            pass
    assert "domain P9" in str(caught.value)
    assert "broker domain update P9 --scim-url" in str(caught.value)


async def test_broker_serve_refuses_to_start_naming_the_domain_and_the_fix(db_url: str) -> None:
    await _store_bad_urls(db_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        BROKER_DATABASE_URL=db_url,
        BROKER_SERVER__PORT=str(_free_port()),
        BROKER_SERVER__ADMIN_PORT="0",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker.cli",
        "serve",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    text = out.decode()
    assert process.returncode == 2, text
    assert "domain P9" in text and "broker domain update P9 --scim-url" in text, text
