"""The domain lifecycle attacked as an outsider would: a hostile peer behind ``domain test`` (it
redirects, answers huge bodies, collects what it is sent), an admin-token holder trying to make
the broker hand its own secrets to a peer, odd token files, odd PATCH bodies and domain names,
and peer or disabled domains' tokens on the admin API. A real broker and a real hostile HTTP
server of the test's own (it answers what an attacker would, not what the test expects)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.app import POOL
from broker.credentials import (
    CredentialProblem,
    Reserved,
    credential_ref,
    read_credential,
    reserved_problem,
)
from broker.tokens import TokenStore
from tests.propagation_support import admin
from tests.scim_support import TEST_KEY_ENV, Broker, Home, new_user, start_broker

# ---------------------------------------------------------------------------------- pure parts


def test_the_brokers_own_secrets_are_never_a_peers_credential(tmp_path: Path) -> None:
    reserved = Reserved(
        env=frozenset({"HOME_TOKEN", "KEY"}), paths=(tmp_path / "key", tmp_path / "data")
    )
    assert reserved_problem("env:PEER_TOKEN", reserved) is None
    assert reserved_problem(f"file:{tmp_path / 'peer.token'}", reserved) is None
    assert reserved_problem(None, reserved) is None
    for bad in ("env:KEY", "env:HOME_TOKEN", "env:BROKER_DATABASE__URL", "env:broker_x"):
        assert reserved_problem(bad, reserved), bad
    for path in (tmp_path / "key", tmp_path / "data" / "outbox.key", tmp_path / "data"):
        assert reserved_problem(f"file:{path}", reserved), path
    # the same file by another name: a symlink is judged by where it points
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "outbox.key").write_text("k\n")
    (tmp_path / "link").symlink_to(tmp_path / "data" / "outbox.key")
    assert reserved_problem(f"file:{tmp_path / 'link'}", reserved)
    assert reserved_problem(f"file:{tmp_path / 'data' / '..' / 'data' / 'outbox.key'}", reserved)


def test_a_token_file_must_be_a_small_regular_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialProblem, match="regular file"):
        read_credential(f"file:{tmp_path}")  # a directory
    with pytest.raises(CredentialProblem, match="cannot be read"):
        read_credential(f"file:{tmp_path / 'missing'}")
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * (3 << 20))  # one 3 MiB line: never taken as a token
    with pytest.raises(CredentialProblem, match="too long"):
        read_credential(f"file:{huge}")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # a writer is there, so an open to read would go through
    try:
        os.write(writer, b"token-from-a-pipe\n")
        with pytest.raises(CredentialProblem, match="regular file"):
            read_credential(f"file:{fifo}")  # never read: it could block or never end
    finally:
        os.close(writer)
    link = tmp_path / "link"
    good = tmp_path / "good"
    good.write_text("t0k3n\nsecond line\n")
    link.symlink_to(good)
    assert read_credential(credential_ref(None, str(link))) == "t0k3n"
    assert read_credential(f"file:{link}") == "t0k3n"


# ---------------------------------------------------------------------------------- a hostile peer


@dataclass
class Hostile:
    """A peer's SCIM server run by an attacker: what it answers is set per path; it records
    every request it gets (method, path with query, headers, body)."""

    answers: dict[str, Callable[[], web.Response]] = field(default_factory=dict)
    seen: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": dict(request.headers),
                "body": body,
            }
        )
        for suffix, answer in self.answers.items():
            if request.path.endswith(suffix):
                return answer()
        return web.json_response({"Resources": [{"id": "x"}], "totalResults": 1})

    def text(self) -> str:
        return repr(self.seen)


def _redirect(status: int, location: str) -> web.Response:
    return web.Response(status=status, headers={"Location": location})


@pytest.fixture
async def hostile() -> AsyncIterator[Hostile]:
    peer = Hostile()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", peer.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    peer.url = str(server.make_url("/scim/v2"))
    try:
        yield peer
    finally:
        await server.close()


@pytest.fixture
async def broker(db_url: str, home: Home) -> AsyncIterator[Broker]:
    domains: dict[str, dict[str, Any]] = {"H": {"kind": "home"}, "D": {}, "E": {}}
    async for running in start_broker(db_url, home, domains):
        yield running


async def _point_at(broker: Broker, hostile: Hostile, **settings: Any) -> None:
    status, body = await admin(broker, "PATCH", "/admin/domains/D", {"scim_url": hostile.url})
    assert status == 200, body
    if settings:
        status, body = await admin(broker, "PATCH", "/admin/domains/D", settings)
        assert status == 200, body


async def test_domain_test_never_follows_a_redirect_and_sends_nothing_of_the_federation(
    broker: Broker, hostile: Hostile, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, created, _ = await broker.call("E", "POST", "/Users", new_user())
    assert status == 201, created  # an entity, so there is an internal ID that could leak
    monkeypatch.setenv("D_PEER_TOKEN", "the-peers-own-token")
    await _point_at(broker, hostile, token_env="D_PEER_TOKEN")
    hostile.answers["/ServiceProviderConfig"] = lambda: _redirect(302, hostile.url + "/stolen")
    hostile.answers["/Schemas"] = lambda: _redirect(307, "http://127.0.0.1:9/elsewhere")
    status, report = await admin(broker, "POST", "/admin/domains/D/test")
    assert status == 200 and report["ok"] is False
    checks = {c["name"]: c for c in report["checks"]}
    assert not checks["service"]["ok"] and "never followed" in checks["service"]["detail"]
    assert not checks["schemas"]["ok"] and "never followed" in checks["schemas"]["detail"]
    assert not any("stolen" in r["path"] for r in hostile.seen)
    assert {r["method"] for r in hostile.seen} == {"GET"}
    assert all(r["body"] == b"" for r in hostile.seen)
    internal = await broker.app[POOL].fetch("SELECT internal_id FROM id_mappings")
    assert internal and not any(r["internal_id"] in hostile.text() for r in internal)
    assert {r["headers"].get("Authorization") for r in hostile.seen} == {
        "Bearer the-peers-own-token"
    }


async def test_domain_test_refuses_a_huge_answer_instead_of_reading_it_all(
    broker: Broker, hostile: Hostile
) -> None:
    await _point_at(broker, hostile)
    padding = "x" * (4 << 20)  # a valid SCIM document of 4 MiB: more than any probe needs
    hostile.answers["/ServiceProviderConfig"] = lambda: web.json_response(
        {"patch": {"supported": True}, "padding": padding}
    )
    status, report = await admin(broker, "POST", "/admin/domains/D/test")
    assert status == 200, report
    service = next(c for c in report["checks"] if c["name"] == "service")
    assert service["ok"] is False and "too large" in service["detail"], service


async def test_an_admin_token_cannot_send_the_brokers_own_secrets_to_a_peer(
    broker: Broker, hostile: Hostile, tmp_path: Path
) -> None:
    key = os.environ[TEST_KEY_ENV]
    await _point_at(broker, hostile)
    before = await broker.app[POOL].fetchrow("SELECT * FROM domains WHERE id = 'D'")
    for body in (
        {"token_env": TEST_KEY_ENV},  # the sealing key's variable
        {"token_env": "BROKER_DATABASE__URL"},  # a variable of the broker's configuration
    ):
        status, error = await admin(broker, "PATCH", "/admin/domains/D", body)
        assert status == 400, (body, error)
        assert error["scimType"] == "invalidValue" and "broker's own" in error["detail"]
    status, _ = await admin(broker, "POST", "/admin/domains/D/test")
    assert status == 200
    assert key not in hostile.text()
    after = await broker.app[POOL].fetchrow("SELECT * FROM domains WHERE id = 'D'")
    assert dict(after) == dict(before)  # no state change


async def test_odd_patch_bodies_get_a_scim_error_and_change_nothing(broker: Broker) -> None:
    before = await broker.app[POOL].fetchrow("SELECT * FROM domains WHERE id = 'D'")
    for raw in (
        b'{"push": true, "push": "yes"}',  # a duplicate key: the last one counts, and is wrong
        b'{"timestamp_precision": 100000000000000000000}',
        b'{"timestamp_precision": -1}',
        b'{"suspend_for": "99999999999999999d"}',
        b'{"on_conflict": null}',
        b'{"on_conflict": ["link"]}',
        b'{"scim_url": "javascript:alert(1)"}',
        b'{"scim_url": "http://user:pw@127.0.0.1/v2"}',
        b'{"scope": "userName eq"}',
        b'{"read_attributes": "userName"}',
        b'{"token_env": "", "token_file": null}',
        b'{"token_file": "a\\u0000b"}',
        b'{"__proto__": {}}',
        b"[]",
        b"null",
        b"\xff\xfe",
        b'{"unlinkable": 1}',
    ):
        status, error, _ = await _raw(broker, "PATCH", "/admin/domains/D", raw)
        assert status == 400, (raw, status, error)
        assert error["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"], raw
    after = await broker.app[POOL].fetchrow("SELECT * FROM domains WHERE id = 'D'")
    assert dict(after) == dict(before)


@pytest.mark.parametrize(
    "name", ["..", "%2E%2E", "a%2Fb", "..%2F..%2Fadmin", "D%00", "%00", "D%20", "%F0%9F%98%80"]
)
async def test_odd_domain_names_are_not_found_never_an_internal_error(
    broker: Broker, name: str
) -> None:
    for method, path in (
        ("GET", f"/admin/domains/{name}"),
        ("PATCH", f"/admin/domains/{name}"),
        ("DELETE", f"/admin/domains/{name}"),
        ("POST", f"/admin/domains/{name}/disable"),
        ("POST", f"/admin/domains/{name}/test"),
    ):
        status, error, _ = await _raw(broker, method, path, b'{"push": false}')
        assert status in (400, 404), (method, path, status, error)
        assert error["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    assert await broker.app[POOL].fetchval("SELECT count(*) FROM domains") == 3


async def test_a_peer_token_and_a_disabled_domains_token_reach_no_lifecycle_route(
    broker: Broker,
) -> None:
    peer_token, _ = await TokenStore(broker.app[POOL]).issue("E")
    routes = (
        ("GET", "/admin/domains"),
        ("GET", "/admin/domains/D"),
        ("PATCH", "/admin/domains/D"),
        ("DELETE", "/admin/domains/D"),
        ("POST", "/admin/domains/D/disable"),
        ("POST", "/admin/domains/E/enable"),
        ("POST", "/admin/domains/D/test"),
    )
    for method, path in routes:
        status, error = await admin(broker, method, path, {"push": False}, token=peer_token)
        assert status == 403, (method, path, error)
    status, _ = await admin(broker, "POST", "/admin/domains/E/disable")
    assert status == 200
    status, error = await admin(broker, "POST", "/admin/domains/E/enable", token=peer_token)
    assert status == 403  # a disabled domain's token does not enable its own domain
    for path in ("/Users", "/Groups", "/ServiceProviderConfig"):
        status, error, _ = await broker.call("E", "GET", path)
        assert status == 403 and "disabled" in error["detail"], path
    assert (
        await broker.app[POOL].fetchval("SELECT status FROM domains WHERE id = 'E'") == "disabled"
    )
    assert await broker.app[POOL].fetchval("SELECT count(*) FROM domains") == 3


async def _raw(
    broker: Broker, method: str, path: str, data: bytes
) -> tuple[int, Any, dict[str, str]]:
    token, _ = await TokenStore(broker.app[POOL]).issue("H", scopes=["admin"])
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"{broker.admin_url}{path}",
            headers={"Authorization": f"Bearer {token}"},
            data=data,
            skip_auto_headers=("Content-Type",),
        ) as response,
    ):
        return response.status, orjson.loads(await response.read()), dict(response.headers)


def test_a_token_file_that_is_not_text_is_refused_in_words(tmp_path: Path) -> None:
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00token\n")
    with pytest.raises(CredentialProblem, match="not text"):
        read_credential(f"file:{binary}")
