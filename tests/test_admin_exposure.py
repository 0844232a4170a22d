"""The admin listener's home-facing endpoint forwards only paths within the home's SCIM
endpoints: nothing a home tool's request says can reach another path of the home's server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from broker.admin.api import Admin, create_admin_app, home_path
from broker.app import POOL, create_app
from broker.config import Config, DatabaseConfig, HomeConfig, PropagationConfig, ServerConfig
from broker.domains import DomainStore
from broker.errors import NotFoundError
from broker.home import HomeClient
from broker.mapping.store import MappingStore
from broker.propagation.journal import Journal
from broker.scim.rewrite import Endpoints
from broker.tokens import TokenStore
from tests.scim_support import _free_port

ATTACKS = [
    "/home/scim/v2/Users/..%2F..%2Fadmin",
    "/home/scim/v2/Users/..%2f..%2fadmin",
    "/home/scim/v2/%2e%2e/x",
    "/home/scim/v2/%2E%2E/%2e%2e/admin",
    "/home/scim/v2/Users/%2e%2e",
    "/home/scim/v2/Users/.%2e/.%2e/admin",
    "/home/scim/v2/Users/../../admin",
    "/home/scim/v2/Users/./x",
    "/home/scim/v2/Users%3Fx",
    "/home/scim/v2/Users%3fattributes=password",
    "/home/scim/v2/Users%23frag",
    "/home/scim/v2/Users/abc%00def",
    "/home/scim/v2/Users/abc%2Fdef",
    "/home/scim/v2/Users/a%5C..%5Cadmin",
    "/home/scim/v2/Users//x",
    "/home/scim/v2/Users/x/y",
    "/home/scim/v2/admin",
    "/home/scim/v2/",
    "/home/scim/v2/Users/%ff",
    "/home/scim/v2/Bulk/x",
]


@pytest.mark.parametrize("raw", ATTACKS)
def test_a_path_outside_the_homes_scim_endpoints_is_refused(raw: str) -> None:
    with pytest.raises(NotFoundError):
        home_path(raw, Endpoints.default())


@pytest.mark.parametrize(
    ("raw", "forwarded"),
    [
        ("/home/scim/v2/Users", "/Users"),
        ("/home/scim/v2/Users?filter=userName%20eq%20%22a%22", "/Users"),
        ("/home/scim/v2/Users/2819c223-7f76-453a-919d-413861904646", "/Users/2819c223-7f76-453a-919d-413861904646"),
        ("/home/scim/v2/Groups/.search", "/Groups/.search"),
        ("/home/scim/v2/.search", "/.search"),
        ("/home/scim/v2/Bulk", "/Bulk"),
        ("/home/scim/v2/ServiceProviderConfig", "/ServiceProviderConfig"),
        ("/home/scim/v2/Schemas/urn:ietf:params:scim:schemas:core:2.0:User", "/Schemas/urn:ietf:params:scim:schemas:core:2.0:User"),
        ("/home/scim/v2/ResourceTypes/User", "/ResourceTypes/User"),
        ("/home/scim/v2/Users/a%20b", "/Users/a%20b"),
    ],
)  # fmt: skip
def test_paths_within_the_homes_scim_endpoints_are_forwarded(raw: str, forwarded: str) -> None:
    assert home_path(raw, Endpoints.default()) == forwarded


@pytest.fixture
async def recording_home() -> AsyncIterator[tuple[str, list[str]]]:
    """A server standing for the home's host: it records every path asked of it."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"detail": "recorded"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/scim/v2", seen
    finally:
        await runner.cleanup()


async def test_home_tools_cannot_reach_other_paths_of_the_homes_server(
    pool: asyncpg.Pool, recording_home: tuple[str, list[str]]
) -> None:
    """The attack: a home tool's request with ``..%2F`` (or ``%2e%2e``, or ``%3F``) in its path,
    which the client library would resolve to a path above the home's SCIM base."""
    home_url, seen = recording_home
    await pool.execute("INSERT INTO domains (id, kind) VALUES ('H', 'home')")
    token, _ = await TokenStore(pool).issue("H")
    async with aiohttp.ClientSession() as session, HomeClient(home_url, "home-secret") as home:
        admin = Admin(pool, MappingStore(pool), home, Journal(pool, None))
        async with TestClient(TestServer(create_admin_app(admin))) as client:
            for raw in ATTACKS:
                # Sent as it is written: encoded=True keeps the client from resolving the dots.
                url = URL(f"http://{client.host}:{client.port}{raw}", encoded=True)
                response = await session.get(
                    url, headers={"Authorization": f"Bearer {token}"}, allow_redirects=False
                )
                assert response.status == 404, raw
                body = await response.json()
                assert body["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
            response = await client.get(
                "/home/scim/v2/Users/abc", headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status == 404  # what the recording home answered
    outside = [path for path in seen if not path.startswith("/scim/v2/")]
    assert outside == [], "the home's server got requests outside its SCIM base"
    assert "/scim/v2/Users/abc" in seen


# --------------------------------------------------------------------------- client disconnects


async def test_a_client_hanging_up_mid_body_is_not_blamed_on_the_database(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp raises ConnectionResetError (an OSError) when the caller goes away while its body
    is read; that is a client disconnect, logged as one, not "database unavailable"."""
    config = Config(
        server=ServerConfig(admin_port=0),
        database=DatabaseConfig(url=db_url),
        home=HomeConfig(scim_url="http://127.0.0.1:9/scim/v2"),
        propagation=PropagationConfig(enabled=False, secret_key_env="TEST_BROKER_KEY"),
    )
    caplog.set_level(logging.DEBUG, logger="broker")
    said = asyncio.Event()
    watcher = _Watch("client disconnected", said)
    logging.getLogger("broker").addHandler(watcher)
    try:
        await _hang_up_mid_body(config, said)
    finally:
        logging.getLogger("broker").removeHandler(watcher)
    messages = [r.getMessage() for r in caplog.records]
    assert not any("database unavailable" in m for m in messages), messages
    gone = next(r for r in caplog.records if "client disconnected" in r.getMessage())
    assert gone.levelno <= logging.INFO


class _Watch(logging.Handler):
    """Sets ``event`` when a record saying ``text`` is logged."""

    def __init__(self, text: str, event: asyncio.Event) -> None:
        super().__init__()
        self.text, self.event = text, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


async def _hang_up_mid_body(config: Config, said: asyncio.Event) -> None:
    # Served as `broker serve` serves (web.run_app's runner): the handler is not cancelled when
    # the client goes (TestServer would cancel it, and nothing would be read or logged).
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await DomainStore(app[POOL]).add("D")
        token, _ = await TokenStore(app[POOL]).issue("D")
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /scim/v2/Users HTTP/1.1\r\nHost: broker\r\n"
            b"Content-Type: application/scim+json\r\nContent-Length: 5000\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n\r\n" + b'{"userName": "pa'
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(said.wait(), timeout=30)
    finally:
        await runner.cleanup()
