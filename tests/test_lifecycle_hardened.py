"""What the hostile review of the domain lifecycle left open, attacked: the command line given
the broker's own secrets and broken scopes (it checks as the admin API does), odd names for new
domains, peers and home answering bodies without end, and a disabled domain's token still
cached in another listener. Real brokers, the real ``broker`` command, real hostile servers of
the test's own (a small aiohttp application answering what an attacker would)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.app import ADMIN, PROXY
from broker.credentials import Reserved
from broker.domains import name_problem, settings_problem
from broker.home import HomeClient, HomeUnavailable
from broker.propagation.policy import Verdict, too_large
from broker.tokens import TokenStore
from tests.propagation_support import FAST, admin, cli, federation, home_tool
from tests.scim_support import TEST_KEY_ENV, Broker, Home, new_user, start_broker, unique
from tests.waiting import until

# ---------------------------------------------------------------------------------- pure parts


def test_a_new_domain_name_is_short_and_made_of_safe_characters() -> None:
    for good in ("H", "P1", "peer.example.org", "a_b-c", "x" * 63):
        assert name_problem(good) is None, good
    for bad in (
        "..",
        "a..b",  # the database's own check lets this one through
        ".hidden",
        "-dash",
        "a/b",
        "a b",
        "a\nb",
        "a\n",  # a regular expression's $ would accept the trailing newline
        "x" * 64,
        "é",
        "",
        "<script>",
    ):
        problem = name_problem(bad)
        assert problem is not None and "letters, digits" in problem and "'..'" in problem, bad
        assert "\n" not in problem, bad  # one line, whatever the name holds


def test_a_domains_credential_and_scope_are_checked_once_for_every_door(tmp_path: Path) -> None:
    reserved = Reserved(env=frozenset({"KEY"}), paths=(tmp_path / "data",))
    assert settings_problem("env:PEER_TOKEN", 'userName sw "a"', reserved) is None
    assert settings_problem(None, None, reserved) is None
    assert "broker's own" in (settings_problem("env:KEY", None, reserved) or "")
    assert "broker's own" in (settings_problem("env:BROKER_X", None, reserved) or "")
    assert "broker's own" in (
        settings_problem(f"file:{tmp_path / 'data' / 'outbox.key'}", None, reserved) or ""
    )
    for scope in ("userName eq", "(", 'userName sw "a" and', "members[value eq"):
        problem = settings_problem(None, scope, reserved)
        assert problem is not None and "not a SCIM filter" in problem, scope


def test_an_answer_too_large_is_retried_if_its_status_is_and_a_dead_letter_otherwise() -> None:
    for status in (200, 201, 400, 404):
        failure = too_large(status, 1024, {}, "POST /Users")
        assert failure.verdict is Verdict.PERMANENT, status
        assert "over 1024 bytes" in failure.reason and "peer_max_answer_bytes" in failure.reason
    for status in (429, 500, 503):
        failure = too_large(status, 1024, {"Retry-After": "7"}, "POST /Users")
        assert failure.verdict is Verdict.TRANSIENT and failure.retry_after == 7.0, status


# ---------------------------------------------------------------------------------- the CLI


async def _domains(db_url: str) -> list[tuple[Any, ...]]:
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT * FROM domains ORDER BY id")
        return [tuple(r.values()) for r in rows]
    finally:
        await conn.close()


def _one_line_refusal(code: int, out: str, words: str) -> None:
    assert code == 1, out
    assert out.count("\n") == 1 and out.startswith("broker: ") and words in out, out
    assert "Traceback" not in out


async def test_domain_add_and_update_refuse_the_brokers_own_secrets_and_bad_scopes(
    db_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "outbox.key").write_text("the-sealing-key\n")
    (tmp_path / "innocent.token").symlink_to(data / "outbox.key")  # followed to what it names
    base = ("--data-dir", str(data), "domain")
    code, out = await cli(db_url, *base, "add", "P1", "--scope", 'userName sw "a"')
    assert code == 0, out
    before = await _domains(db_url)
    refused = (
        (("--token-env", TEST_KEY_ENV), "broker's own"),  # the sealing key's variable
        (("--token-env", "BROKER_DATABASE_URL"), "broker's own"),
        (("--token-file", str(tmp_path / "innocent.token")), "broker's own"),
        (("--token-file", str(data / "pg" / "postgresql.conf")), "broker's own"),
        (("--scope", "userName eq"), "not a SCIM filter"),
        (("--scope", '(userName sw "a"'), "not a SCIM filter"),
    )
    for options, words in refused:
        code, out = await cli(db_url, *base, "add", "P2", *options)
        _one_line_refusal(code, out, words)
        code, out = await cli(db_url, *base, "update", "P1", *options)
        _one_line_refusal(code, out, words)
    assert await _domains(db_url) == before  # nothing changed
    code, out = await cli(db_url, *base, "update", "P1", "--token-env", "P1_TOKEN")
    assert code == 0, out


async def test_new_domain_names_follow_the_rule_and_old_odd_names_keep_working(
    db_url: str,
) -> None:
    for name in ("a..b", "x" * 64):
        code, out = await cli(db_url, "domain", "add", name)
        _one_line_refusal(code, out, "no '..'")
    assert await _domains(db_url) == []
    # A name stored before the rule (the database's own check lets '..' through): it keeps
    # working, and coming back after a removal with its mappings kept.
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("INSERT INTO domains (id, kind) VALUES ('old..peer', 'peer')")
    finally:
        await conn.close()
    code, out = await cli(db_url, "domain", "update", "old..peer", "--scope", 'userName sw "a"')
    assert code == 0, out
    code, out = await cli(db_url, "domain", "add", "old..peer")
    assert code == 1 and "exists already" in out, out
    code, out = await cli(db_url, "domain", "remove", "old..peer", "--keep-mappings")
    assert code == 0, out
    code, out = await cli(db_url, "domain", "add", "old..peer")
    assert code == 0 and "old..peer" in out, out


# ---------------------------------------------------------------------------------- huge answers

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def hostile() -> AsyncIterator[dict[str, Answer]]:
    """A server whose answer (the same for every request) the test sets; its URL under "url"."""
    answers: dict[str, Any] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        answer: Answer = answers["answer"]
        return await answer(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    answers["url"] = str(server.make_url("/scim/v2"))
    try:
        yield answers
    finally:
        await server.close()


def _huge(status: int, size: int = 8 << 20) -> Answer:
    """A JSON document of ``size`` bytes, its length announced."""

    async def answer(_request: web.Request) -> web.StreamResponse:
        body = b'{"schemas": [], "padding": "' + b"x" * size + b'"}'
        return web.Response(status=status, body=body, content_type="application/scim+json")

    return answer


async def _endless(request: web.Request) -> web.StreamResponse:
    """A 200 whose body never ends (chunked, no length), until the client goes away; it stops
    at 64 MiB so that a client reading it all fails on what it read (not JSON)."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/scim+json"})
    await response.prepare(request)
    chunk = b"[" * 65536
    try:
        for _ in range(1024):
            await response.write(chunk)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass
    return response


async def test_home_answering_without_end_is_cut_off_and_said_so(
    hostile: dict[str, Any],
) -> None:
    hostile["answer"] = _endless
    async with HomeClient(hostile["url"], None, limit=1 << 20) as home:
        with pytest.raises(HomeUnavailable, match=f"more than {1 << 20} bytes"):
            await home.request("GET", "/Users")
        assert "more than" in (await home.reachable() or "")


@pytest.fixture
async def hostile_peer(
    db_url: str, home: Home, hostile: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Broker]:
    async for running in federation(db_url, home, {"P": hostile["url"]}, monkeypatch, "t0k"):
        yield running


async def _last_error(broker: Broker) -> dict[str, Any] | None:
    record = await broker.pool.fetchrow(
        "SELECT state, last_error FROM outbox WHERE domain_id = 'P' AND last_error IS NOT NULL"
    )
    return None if record is None else {"state": record["state"], **record["last_error"]}


async def test_a_peer_answering_a_huge_body_fails_the_delivery_and_says_why(
    hostile_peer: Broker, hostile: dict[str, Any]
) -> None:
    assert FAST.peer_max_answer_bytes == 1 << 20  # the default the peer is held to
    hostile["answer"] = _huge(503)  # a failing peer, huge error page: retried as a 503 is
    status, _ = await home_tool(hostile_peer, "POST", "/Users", new_user())
    assert status == 201

    async def retried() -> dict[str, Any] | None:
        error = await _last_error(hostile_peer)
        return error if error and "HTTP 503" in error["reason"] else None

    error = await until(retried, "the huge 503 is a retry")
    assert error["verdict"] == "transient" and error["state"] != "dead", error
    assert f"over {1 << 20} bytes, left unread" in error["reason"], error

    hostile["answer"] = _huge(201)  # a success no SCIM service answers with: a dead letter

    async def dead() -> dict[str, Any] | None:
        error = await _last_error(hostile_peer)
        return error if error and error["state"] == "dead" else None

    error = await until(dead, "the huge 201 is a dead letter")
    assert error["verdict"] == "permanent" and "HTTP 201" in error["reason"], error
    assert "peer_max_answer_bytes" in error["reason"], error
    status, listed = await admin(hostile_peer, "GET", "/admin/deliveries?state=dead")
    assert status == 200 and "left unread" in str(listed), listed


# ---------------------------------------------------------------------------------- tokens


@pytest.fixture
async def broker(db_url: str, home: Home) -> AsyncIterator[Broker]:
    domains: dict[str, dict[str, Any]] = {"H": {"kind": "home"}, "D": {}, "E": {}}
    async for running in start_broker(db_url, home, domains):
        yield running


async def test_disabling_a_domain_elsewhere_refuses_its_cached_tokens_at_once(
    broker: Broker, db_url: str, home: Home
) -> None:
    name = unique("cached")
    home.call("POST", "/Users", new_user(name))  # what the domains read holds a home ID
    only = {"filter": f'userName eq "{name}"'}  # not the session home's other users

    async def listening() -> bool:  # a listener that comes up later drops every cache first
        return bool(
            await broker.pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND query = 'LISTEN \"broker_domains\"'"
            )
        )

    await until(listening, "the broker listens for domain changes")
    operator, _ = await TokenStore(broker.pool).issue("H", scopes=["admin"])
    # The verdicts are cached for an hour here: only the change's notice can drop them.
    broker.app[PROXY].tokens.cache_seconds = 3600
    broker.app[ADMIN].tokens.cache_seconds = 3600
    status, _ = await admin(broker, "GET", "/admin/domains", token=operator)
    assert status == 200
    for domain in ("D", "E"):
        status, body, _ = await broker.call(domain, "GET", "/Users", params=only)
        assert status == 200, (domain, body)
    # D's token revoked behind the broker's back (no notice): its cached verdict stays, which
    # shows that E's change drops E's verdicts only.
    await broker.pool.execute("UPDATE domain_tokens SET revoked_at = now() WHERE domain_id = 'D'")
    for domain in ("E", "H"):  # by another process: the broker command
        code, out = await cli(db_url, "domain", "disable", domain)
        assert code == 0, out

    async def e_refused() -> bool:
        status, _, _ = await broker.call("E", "GET", "/Users", params=only)
        return status == 403

    async def operator_refused() -> bool:
        status, _ = await admin(broker, "GET", "/admin/domains", token=operator)
        return status == 403

    await until(e_refused, "E's cached token is refused on the SCIM port")
    await until(operator_refused, "H's cached operator token is refused on the admin port")
    status, body, _ = await broker.call("D", "GET", "/Users", params=only)
    assert status == 200, body
    assert (
        await broker.pool.fetchval("SELECT count(*) FROM audit_log WHERE action = 'domain_disable'")
        == 2
    )
