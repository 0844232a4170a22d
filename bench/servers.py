"""The home and the two peers the broker is measured against, each run as its own process.

- ``home``: a fast home serving fixed SCIM documents (one user; a page of 100 users, each in 5
  groups), so that the home costs next to nothing and what is measured is what sits in front.
  It is a plain asyncio protocol answering from bytes made once per document and host (no
  HTTP framework: aiohttp's server cost about 160 us a page, as much as a sixth of the
  broker's, on the cores the broker is measured on). ``home-aiohttp`` is the same home in
  aiohttp, as it was before 2026-12-06 16:00.
- ``proxy``: a bare aiohttp pass-through proxy with no rewriting, the floor any proxy pays.
- ``parse``: the same proxy, but it parses each body and serialises it again (orjson), the floor
  of any proxy that must read what it forwards, as the broker must.

    python bench/servers.py home PORT
    python bench/servers.py home-aiohttp PORT
    python bench/servers.py proxy PORT HOME_URL
    python bench/servers.py parse PORT HOME_URL
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson
from aiohttp import web

BASE = "/v2"
GROUPS = [uuid.UUID(int=1000 + g).hex for g in range(5)]
USERS = [uuid.UUID(int=i + 1).hex for i in range(100)]


def user(user_id: str, host: str) -> dict[str, object]:
    return {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "id": user_id,
        "userName": f"user-{user_id[-6:]}",
        "displayName": "Barbara Jensen",
        "emails": [{"value": f"{user_id[-6:]}@example.org", "type": "work", "primary": True}],
        "active": True,
        "groups": [
            {"value": g, "$ref": f"http://{host}{BASE}/Groups/{g}", "display": f"group {n}"}
            for n, g in enumerate(GROUPS)
        ],
        "meta": {
            "resourceType": "User",
            "created": "2026-01-01T00:00:00Z",
            "lastModified": "2026-01-01T00:00:00Z",
            "location": f"http://{host}{BASE}/Users/{user_id}",
            "version": 'W/"1"',
        },
    }


def error(status: int, detail: str) -> dict[str, object]:
    return {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
        "status": str(status),
        "detail": detail,
    }


SERVICE_PROVIDER_CONFIG = {
    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
    "patch": {"supported": False},
    "bulk": {"supported": False, "maxOperations": 0, "maxPayloadSize": 0},
    "filter": {"supported": False, "maxResults": 0},
    "changePassword": {"supported": False},
    "sort": {"supported": False},
    "etag": {"supported": False},
    "authenticationSchemes": [],
}


def list_response(resources: list[dict[str, object]]) -> dict[str, object]:
    return {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
        "totalResults": len(resources),
        "startIndex": 1,
        "itemsPerPage": len(resources),
        "Resources": resources,
    }


def answer(method: str, target: str, host: str) -> tuple[int, dict[str, object]]:
    """What the home answers to a request: (status, document). A filter on one ID (what the
    broker sends for a scoped domain's read of one user) is answered with that user alone, as a
    real home answers it: the broker is not made to read a whole page to take one user from it.
    Any other filter is ignored."""
    if method != "GET":
        return 405, error(405, "this home only reads")
    url = urlsplit(target)
    path = url.path
    if path == BASE + "/ServiceProviderConfig":  # what the broker's /readyz asks home for
        return 200, SERVICE_PROVIDER_CONFIG
    if path == BASE + "/Users":
        match = re.match(r'id eq "([0-9a-f]+)"', parse_qs(url.query).get("filter", [""])[0])
        if match:
            return 200, list_response([user(match[1], host)] if match[1] in USERS else [])
        return 200, list_response([user(u, host) for u in USERS])
    if path.startswith(BASE + "/Users/"):
        user_id = path[len(BASE + "/Users/") :]
        if user_id in USERS:
            return 200, user(user_id, host)
        return 404, error(404, "not found")
    return 404, error(404, "not found")


REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 400: b"Bad Request"}


class Home(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, enough for the broker's clients and wrk: the request line and
    headers are read up to the blank line (a body, by its Content-Length, is skipped); each
    answer is made once per request target and host and kept as bytes."""

    answers: ClassVar[dict[tuple[bytes, bytes], bytes]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            line, _, rest = head.partition(b"\r\n")
            host = b"127.0.0.1"
            length = 0
            for header in rest.split(b"\r\n"):
                name, _, value = header.partition(b":")
                name = name.strip().lower()
                if name == b"host":
                    host = value.strip()
                elif name == b"content-length":
                    length = int(value)
            if len(buffer) < end + 4 + length:
                break
            buffer = buffer[end + 4 + length :]
            self.transport.write(self.respond(line, host))
        self.buffer = buffer

    def respond(self, line: bytes, host: bytes) -> bytes:
        key = (line, host)
        made = self.answers.get(key)
        if made is None:
            parts = line.split(b" ")
            if len(parts) != 3:
                status, document = 400, error(400, "not an HTTP request line")
            else:
                status, document = answer(parts[0].decode(), parts[1].decode(), host.decode())
            body = json.dumps(document).encode()
            made = b"".join(
                [
                    b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"")),
                    b"Content-Type: application/scim+json\r\n",
                    b"Content-Length: %d\r\n\r\n" % len(body),
                    body,
                ]
            )
            if len(self.answers) < 10_000:
                self.answers[key] = made
        return made


async def serve_home(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Home, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def home_app() -> web.Application:
    """The same home in aiohttp (``home-aiohttp``), answering what ``answer`` says."""
    cache: dict[tuple[str, str, str], tuple[int, bytes]] = {}

    async def any_request(request: web.Request) -> web.Response:
        key = (request.method, request.path_qs, request.host)
        if key not in cache:
            status, document = answer(*key)
            cache[key] = status, json.dumps(document).encode()
        status, body = cache[key]
        return web.Response(body=body, status=status, content_type="application/scim+json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_request)
    return app


def proxy_app(home_url: str, *, parse: bool = False) -> web.Application:
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as client:
            app[session_key] = client
            yield

    async def forward(request: web.Request) -> web.Response:
        async with request.app[session_key].get(home_url + request.path_qs) as response:
            body = await response.read()
            if parse:
                body = orjson.dumps(orjson.loads(body))
            return web.Response(
                body=body, status=response.status, content_type="application/scim+json"
            )

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_get("/{tail:.*}", forward)
    return app


if __name__ == "__main__":
    role, port = sys.argv[1], int(sys.argv[2])
    if role == "home":
        asyncio.run(serve_home(port))
    else:
        application = (
            home_app() if role == "home-aiohttp" else proxy_app(sys.argv[3], parse=role == "parse")
        )
        web.run_app(application, host="127.0.0.1", port=port, access_log=None, print=None)
