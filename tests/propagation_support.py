"""Push peers for the propagation tests: tenants of one real scim2-server process (each test gets
fresh ones), a gate in front of a peer that can be closed or made to fail (network faults, which
a real server cannot be asked to produce), and helpers to wait for the outbox to drain."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from broker.app import POOL
from tests.scim_support import HOME_ID, Broker, Home, _free_port, scim_server


@pytest.fixture(scope="session")
def peer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    """One scim2-server process serving a tenant per peer (``/TENANT/v2``)."""
    with scim_server(tmp_path_factory.mktemp("peers"), "--dynamic-tenants", base="") as server:
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
    _runner: web.AppRunner | None = None
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
            if self.lose_answers:
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
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

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
