"""Push peers for the propagation tests: tenants of one real scim2-server process (each test gets
fresh ones), a gate in front of a peer that can be closed or made to fail (network faults, which
a real server cannot be asked to produce), and helpers to wait for the outbox to drain."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from broker.app import DELIVERER, POOL
from broker.config import EventsConfig, PropagationConfig
from broker.domains import DomainStore
from broker.tokens import TokenStore
from tests.scim_support import HOME_ID, Broker, Home, _free_port, scim_server, start_broker
from tests.waiting import until


@pytest.fixture(scope="session")
def peer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    """One scim2-server process serving a tenant per peer (``/TENANT/v2``)."""
    with scim_server(tmp_path_factory.mktemp("peers"), "--dynamic-tenants", base="") as server:
        yield server


@pytest.fixture(scope="session")
def homes_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    """Another scim2-server process, whose tenants are homes of a test's own. Never a tenant of
    the peer server as a home: the leak recorder tells home by its origin, and would take every
    ID the peers assign for a home ID from then on."""
    with scim_server(tmp_path_factory.mktemp("homes"), "--dynamic-tenants", base="") as server:
        yield server


def tenant(server: Home, name: str) -> Home:
    """A fresh, empty peer: a new tenant of the peer server."""
    return Home(f"{server.url}/{name}-{uuid.uuid4().hex[:8]}/v2", server.token)


def held(peer: Home) -> dict[str, list[dict[str, Any]]]:
    """Everything a peer holds, straight from it."""
    out = {}
    for endpoint in ("Users", "Groups"):
        status, body = peer.call("GET", f"/{endpoint}?count=1000")
        assert status == 200, body
        out[endpoint] = body.get("Resources", [])
    return out


def assert_no_internal_id(peer: Home, internal_ids: set[str]) -> None:
    """Nothing the peer holds names an internal ID (home's IDs)."""
    text = json.dumps(held(peer))
    leaked = {i for i in internal_ids if i in text}
    assert not leaked, f"internal IDs reached the peer: {sorted(leaked)}"


def home_ids(home: Home) -> set[str]:
    """Every ID home holds (users and groups)."""
    found = set()
    for endpoint in ("Users", "Groups"):
        status, body = home.call("GET", f"/{endpoint}?attributes=id&count=10000")
        assert status == 200
        found |= {r["id"] for r in body.get("Resources", [])}
    assert all(HOME_ID.fullmatch(i) for i in found)
    return found


async def quiesce(broker: Broker, within: float = 30.0) -> None:
    """Until no delivery is waiting or in flight."""
    deadline = time.monotonic() + within
    while True:
        left = await broker.app[POOL].fetchval(
            "SELECT count(*) FROM outbox WHERE state IN ('pending', 'in_flight')"
        )
        if left == 0:
            return
        if time.monotonic() > deadline:
            rows = await broker.app[POOL].fetch(
                "SELECT id, domain_id, state, attempts, last_error FROM outbox "
                "WHERE state IN ('pending', 'in_flight') ORDER BY id LIMIT 5"
            )
            raise AssertionError(f"{left} deliveries still waiting: {[dict(r) for r in rows]}")
        await asyncio.sleep(0.05)


async def peer_id(broker: Broker, domain: str, internal_id: str) -> str | None:
    value: str | None = await broker.app[POOL].fetchval(
        "SELECT external_id FROM id_mappings WHERE domain_id = $1 AND internal_id = $2 "
        "AND is_primary AND state = 'active'",
        domain,
        internal_id,
    )
    return value


@dataclass
class Gate:
    """A TCP front for a real peer: open, closed (nothing listens: connection refused), or
    answering the next requests with scripted failures. It records the requests it forwards."""

    upstream: str
    port: int = field(default_factory=_free_port)
    failures: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    forwarded: list[tuple[str, str, Any]] = field(default_factory=list)
    lose_answers: int = 0
    """Forward the next requests, then answer 502 as if the answer was lost on the way."""
    hold: asyncio.Event | None = None
    """While set to an unset event: forward requests, and hold the answers to ``held_method``
    until it is set."""
    held_method: str = "PATCH"
    refuse_bulk: int | None = None
    """Answer each POST /Bulk with this status, forwarding nothing (a peer that does not take
    Bulk, whatever its ServiceProviderConfig says); the refused bodies are kept in ``refused``."""
    refused: list[Any] = field(default_factory=list)
    lose_bulk: int = 0
    """Forward the next POST /Bulk requests, then answer 502 as if the answer was lost."""
    _runner: web.AppRunner | None = None
    _listening: socket.socket | None = None
    _handing: set[asyncio.Future[Any]] = field(default_factory=set)
    _connections: set[asyncio.BaseTransport] = field(default_factory=set)
    _session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2"

    async def _handle(self, request: web.Request) -> web.Response:
        if self.failures:
            status, headers = self.failures.pop(0)
            return web.json_response(
                {
                    "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
                    "status": str(status),
                    "detail": "injected",
                },
                status=status,
                headers=headers,
            )
        assert self._session is not None
        tail = request.match_info["tail"]
        sent = await request.read()
        if tail == "Bulk" and self.refuse_bulk is not None:
            self.refused.append(json.loads(sent))
            return web.json_response({"detail": "no Bulk here"}, status=self.refuse_bulk)
        self.forwarded.append((request.method, "/" + tail, json.loads(sent) if sent else None))
        async with self._session.request(
            request.method,
            f"{self.upstream}/{tail}",
            params=request.query,
            data=sent or None,
            headers={
                k: v for k, v in request.headers.items() if k in ("Authorization", "Content-Type")
            },
        ) as response:
            body = await response.read()
            if self.hold is not None and request.method == self.held_method:
                await self.hold.wait()
            if self.lose_answers or (tail == "Bulk" and self.lose_bulk):
                if tail == "Bulk" and self.lose_bulk:
                    self.lose_bulk -= 1
                else:
                    self.lose_answers -= 1
                return web.Response(status=502, text="answer lost")
            return web.Response(
                status=response.status,
                body=body,
                headers={
                    "Content-Type": response.headers.get("Content-Type", "application/scim+json")
                },
            )

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/v2/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        listening = socket.create_server(("127.0.0.1", self.port))
        listening.setblocking(False)
        server = self._runner.server
        assert server is not None
        asyncio.get_running_loop().add_reader(listening, self._accept, listening, server)
        self._listening = listening

    def _accept(self, listening: socket.socket, server: web.Server) -> None:
        """Connections accepted here, not by ``loop.create_server``: an asyncio server closed
        while a connection it accepted is being set up leaves that socket unclosed (an
        "unclosed socket" warning, so a failed test, about once in 30 runs of the merge and
        split properties). They are accepted as they come, in this callback (a task awaiting
        ``sock_accept`` and cancelled as it accepted would lose the socket the same way); each
        is handed to aiohttp and held, to be closed with the gate."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            handing = asyncio.ensure_future(loop.connect_accepted_socket(server, conn))
            self._handing.add(handing)
            handing.add_done_callback(functools.partial(self._handed, conn=conn))

    def _handed(self, done: asyncio.Future[Any], *, conn: socket.socket) -> None:
        self._handing.discard(done)
        if done.cancelled() or done.exception() is not None:
            conn.close()
        else:
            self._connections.add(done.result()[0])

    async def close(self) -> None:
        """Nothing listens any more (connection refused), and every connection is closed."""
        if self._runner is not None:
            assert self._listening is not None
            asyncio.get_running_loop().remove_reader(self._listening)
            self._listening.close()
            await asyncio.gather(*self._handing, return_exceptions=True)
            runner, self._runner, self._listening = self._runner, None, None
            await runner.cleanup()
            for transport in self._connections:
                transport.close()
            self._connections.clear()

    async def shutdown(self) -> None:
        await self.close()
        if self._session is not None:
            await self._session.close()


@asynccontextmanager
async def gate(upstream: Home) -> AsyncIterator[Gate]:
    """An open gate in front of ``upstream``."""
    front = Gate(upstream.url)
    await front.open()
    try:
        yield front
    finally:
        await front.shutdown()


FAST = PropagationConfig(
    home_poll_interval=0,
    backoff_base=0.05,
    backoff_ceiling=0.3,
    quarantine_after=60,
    quarantine_retry=0.3,
    lease=5,
    conflict_patience=0.5,
    # Home is shared by the session's tests: a new peer gets none of it unless a test asks.
    initial_sync=False,
)


async def federation(
    db_url: str,
    home: Home,
    peers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    token: str,
    settings: PropagationConfig = FAST,
    events: EventsConfig | None = None,
    **peer_options: Any,
) -> AsyncIterator[Broker]:
    """The broker with home H (kind home), a pull domain D and the push ``peers`` (name -> URL)."""
    domains: dict[str, dict[str, Any]] = {"H": {"kind": "home"}, "D": {}}
    for name, url in peers.items():
        monkeypatch.setenv(f"{name}_TOKEN", token)
        domains[name] = {
            "scim_url": url,
            "credential_ref": f"env:{name}_TOKEN",
            "push": True,
            **peer_options,
        }
    async for broker in start_broker(db_url, home, domains, propagation=settings, events=events):
        yield broker


def patch(*operations: dict[str, Any]) -> dict[str, Any]:
    return {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": list(operations),
    }


async def home_tool(
    broker: Broker, method: str, path: str, body: Any = None, *, token: str | None = None
) -> tuple[int, Any]:
    """Home's own tools, writing through the broker's home-facing endpoint."""
    headers = {
        "Authorization": f"Bearer {token or broker.tokens['H']}",
        "Content-Type": "application/scim+json",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"{broker.admin_url}/home/scim/v2{path}",
            data=json.dumps(body) if body is not None else None,
            headers=headers,
        ) as response,
    ):
        raw = await response.text()
        return response.status, json.loads(raw) if raw else None


async def admin(
    broker: Broker, method: str, path: str, body: Any = None, *, token: str | None = None
) -> tuple[int, Any]:
    """The admin API, with an admin token unless another is given ("" for none)."""
    status, document, _ = await admin_call(broker, method, path, body, token=token)
    return status, document


async def admin_call(
    broker: Broker, method: str, path: str, body: Any = None, *, token: str | None = None
) -> tuple[int, Any, Mapping[str, str]]:
    """The admin API: status, JSON body and headers."""
    if token is None:
        token, _ = await TokenStore(broker.app[POOL]).issue("H", scopes=["admin"])
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"{broker.admin_url}{path}",
            headers=headers,
            data=json.dumps(body) if body is not None else None,
        ) as response,
    ):
        return response.status, await response.json(), dict(response.headers)


async def cli(db_url: str, *args: str) -> tuple[int, str]:
    """The ``broker`` command, as an operator runs it, on the test's database."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker.cli",
        *args,
        # The brokers the tests start use this key (tests.scim_support.keyed); so does the CLI.
        env={
            "BROKER_PROPAGATION__SECRET_KEY_ENV": "TEST_BROKER_KEY",
            **os.environ,
            "BROKER_DATABASE_URL": db_url,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


async def admin_metrics(broker: Broker) -> str:
    """The Prometheus text of the broker's admin listener (the only place it is served)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{broker.admin_url}/metrics") as response,
    ):
        assert response.status == 200
        return await response.text()


def peer_user(peer: Home, peer_user_id: str) -> dict[str, Any]:
    status, body = peer.call("GET", f"/Users/{peer_user_id}")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def writes_waiting(broker: Broker, peer: str) -> int:
    """Writes handed to ``peer``'s client and waiting for a request slot, to travel together in
    the next SCIM Bulk request (what a test that wants a Bulk request waits for)."""
    clients = broker.app[DELIVERER].syncs.tools.clients._clients
    client = clients.get(peer)
    return 0 if client is None else len(client.combiner._waiting)


async def crowd(
    broker: Broker, front: Gate, bodies: list[dict[str, Any]], *, together: bool = True
) -> list[dict[str, Any]]:
    """Users (``bodies``) created in home while push peer P1 (behind ``front``) is disabled,
    then delivered once it is enabled: the peer's answers to POSTs are held until the writes
    are about to go together (a Bulk request at the gate, held or refused, or two writes
    waiting in P1's client for a slot: claimed is not enough, a delivery reads home before it
    writes), or, ``together`` false, until every one is claimed; then released, and awaited
    until every delivery is settled. Home's answers to the creates."""
    pool = broker.app[POOL]
    domains = DomainStore(pool)
    await domains.set_enabled("P1", False, actor="test")
    users = [(await home_tool(broker, "POST", "/Users", body))[1] for body in bodies]
    front.hold, front.held_method = asyncio.Event(), "POST"
    await domains.set_enabled("P1", True, actor="test")

    async def ready() -> bool:
        if not front.forwarded:
            return False
        if not together:
            claimed = await pool.fetchval("SELECT count(*) FROM outbox WHERE state = 'in_flight'")
            return bool(claimed >= len(bodies))
        bulk = front.refused or any(path == "/Bulk" for _, path, _ in front.forwarded)
        return bool(bulk) or writes_waiting(broker, "P1") >= 2

    async def settled() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT count(*) = 0 FROM outbox WHERE state IN ('pending', 'in_flight')"
            )
        )

    await until(ready, "writes at the peer and others waiting for its slots", within=30)
    front.hold.set()
    await until(settled, "every delivery settled", within=60)
    return users
