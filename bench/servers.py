"""The two peers the broker is measured against, each run as its own process.

- ``home``: a fast home serving fixed SCIM documents (one user; a page of 100 users, each in 5
  groups), so that the home costs next to nothing and what is measured is what sits in front.
- ``proxy``: a bare aiohttp pass-through proxy with no rewriting, the floor any proxy pays.
- ``parse``: the same proxy, but it parses each body and serialises it again (orjson), the floor
  of any proxy that must read what it forwards, as the broker must.

    python bench/servers.py home PORT
    python bench/servers.py proxy PORT HOME_URL
    python bench/servers.py parse PORT HOME_URL
"""

from __future__ import annotations

import json
import re
import sys
import uuid

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


def home_app() -> web.Application:
    cache: dict[tuple[str, str], bytes] = {}

    def cached(key: tuple[str, str], make: object) -> bytes:
        if key not in cache:
            cache[key] = json.dumps(make() if callable(make) else make).encode()
        return cache[key]

    async def one(request: web.Request) -> web.Response:
        user_id = request.match_info["id"]
        if user_id not in USERS:
            return web.json_response(
                {
                    "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
                    "status": "404",
                    "detail": "not found",
                },
                status=404,
            )
        body = cached(("one", request.host + user_id), lambda: user(user_id, request.host))
        return web.Response(body=body, content_type="application/scim+json")

    async def page(request: web.Request) -> web.Response:
        # A filter on one ID (what the broker sends for a scoped domain's read of one user) is
        # answered with that user alone, as a real home answers it: the broker is not made to
        # read a whole page to take one user from it. Any other filter is ignored.
        match = re.match(r'id eq "([0-9a-f]+)"', request.query.get("filter", ""))
        if match:
            found = [user(match[1], request.host)] if match[1] in USERS else []
            return web.json_response(
                {
                    "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
                    "totalResults": len(found),
                    "startIndex": 1,
                    "itemsPerPage": len(found),
                    "Resources": found,
                },
                content_type="application/scim+json",
            )
        body = cached(
            ("page", request.host),
            lambda: {
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
                "totalResults": len(USERS),
                "startIndex": 1,
                "itemsPerPage": len(USERS),
                "Resources": [user(u, request.host) for u in USERS],
            },
        )
        return web.Response(body=body, content_type="application/scim+json")

    async def service_provider_config(request: web.Request) -> web.Response:
        # What the broker's /readyz asks home for (bench/run.py waits for it).
        return web.json_response(
            {
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
                "patch": {"supported": False},
                "bulk": {"supported": False, "maxOperations": 0, "maxPayloadSize": 0},
                "filter": {"supported": False, "maxResults": 0},
                "changePassword": {"supported": False},
                "sort": {"supported": False},
                "etag": {"supported": False},
                "authenticationSchemes": [],
            },
            content_type="application/scim+json",
        )

    async def not_here(request: web.Request) -> web.Response:
        return web.json_response({"status": "404"}, status=404)

    app = web.Application()
    app.router.add_get(BASE + "/Users/{id}", one)
    app.router.add_get(BASE + "/Users", page)
    app.router.add_get(BASE + "/ServiceProviderConfig", service_provider_config)
    app.router.add_get(BASE + "/{tail:.*}", not_here)
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
    application = home_app() if role == "home" else proxy_app(sys.argv[3], parse=role == "parse")
    web.run_app(application, host="127.0.0.1", port=port, access_log=None, print=None)
