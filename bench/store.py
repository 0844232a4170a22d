"""A fast in-memory SCIM service for benchmarks, run as its own process: what a home or a peer
costs when it is not the bottleneck (scim2-server validates every document with pydantic and
serves each request on a new connection and thread, so on a small machine it takes more CPU
than the broker itself).

It keeps users and groups per tenant (the path before ``/v2``: ``/v2`` alone is one tenant,
``/t1/v2`` another) and speaks as much SCIM as the benchmarks use: create (``userName`` unique),
read, replace, PATCH with attribute paths (``replace``, ``add``, ``remove``; no value filters),
delete, lists and ``.search`` with ``eq`` and ``pr`` filters joined by ``or`` (two such joined
by ``and`` in parentheses, as the broker asks for a peer with a scope), paged by ``startIndex`` and
``count`` (RFC 7644 section 3.4.2.4, in the order the resources were created), and the discovery
endpoints, and SCIM Bulk (``POST /TENANT/v2/Bulk``, RFC 7644 section 3.7: each operation answered
as its own request would be, in order, with its ``location``; no ``bulkId`` references between
operations; ``--no-bulk`` turns it off and says so in the ServiceProviderConfig).
``POST /TENANT/v2/Users/.load`` (a benchmark's bulk load, not SCIM) creates many users
at once from a template, without a request each. Connections are kept alive. With LATENCY (seconds), every answer waits that long first, as a
remote peer's would (its round trip and its own work), without taking CPU here.

    python bench/store.py PORT TOKEN [LATENCY] [--no-bulk]
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
LIST = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
TYPES = {"Users": "User", "Groups": "Group"}
EQ = re.compile(r'^\s*([\w.:]+)\s+eq\s+"((?:[^"\\]|\\.)*)"\s*$')
PR = re.compile(r"^\s*([\w.:]+)\s+pr\s*$")


def answer(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/scim+json"
    )


def error(status: int, detail: str, scim_type: str | None = None) -> web.Response:
    body = {"schemas": [ERROR], "status": str(status), "detail": detail}
    if scim_type:
        body["scimType"] = scim_type
    return answer(body, status)


def lookup(resource: dict[str, Any], path: str) -> list[Any]:
    """The values at a dotted path (multi-valued attributes flattened)."""
    values: list[Any] = [resource]
    for part in path.split("."):
        found: list[Any] = []
        for value in values:
            if isinstance(value, dict):
                got = next((v for k, v in value.items() if k.lower() == part.lower()), None)
                if isinstance(got, list):
                    found.extend(got)
                elif got is not None:
                    found.append(got)
        values = found
    return values


def by_id(resources: dict[str, dict[str, Any]], expression: str) -> list[dict[str, Any]] | None:
    """The resources a filter whose first part names IDs only (``id eq "x" or id eq "y"``,
    perhaps ``and`` more) can match, found by key as a real home's index finds them; None for
    any other filter (every resource is read)."""
    first = re.split(r"\)\s+and\s+\(", expression.strip())[0]
    ids = []
    for term in re.split(r"\s+or\s+", first.strip().strip("()")):
        found = EQ.match(term.strip().strip("()"))
        if found is None or found.group(1).lower() != "id":
            return None
        ids.append(orjson.loads(f'"{found.group(2)}"'))
    return [resources[i] for i in dict.fromkeys(ids) if i in resources]


def matches(resource: dict[str, Any], expression: str) -> bool:
    """``a eq "x" or b eq "y"`` and ``a pr``, parentheses around the whole or its terms allowed,
    and two such in parentheses joined by ``and`` (what the broker asks for a peer with a
    scope: ``(id eq "x" or id eq "y") and (userName pr)``)."""
    sides = re.split(r"\)\s+and\s+\(", expression.strip())
    if len(sides) > 1:
        return all(matches(resource, side) for side in sides)
    for term in re.split(r"\s+or\s+", expression.strip().strip("()")):
        term = term.strip().strip("()")
        present = PR.match(term)
        if present is not None:
            if any(v not in (None, "", [], {}) for v in lookup(resource, present.group(1))):
                return True
            continue
        found = EQ.match(term)
        if found is None:
            raise ValueError(f"unsupported filter term {term!r}")
        attribute, value = found.group(1), orjson.loads(f'"{found.group(2)}"')
        if value in lookup(resource, attribute):
            return True
    return False


def patched(resource: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    result = dict(resource)
    for operation in operations:
        op, path, value = (
            operation.get("op", "").lower(),
            operation.get("path"),
            operation.get("value"),
        )
        if path is None:
            if op in ("add", "replace") and isinstance(value, dict):
                result.update(value)
                continue
            raise ValueError("an operation without a path must add or replace an object")
        if "[" in path:
            raise ValueError(f"value filters are not supported: {path}")
        *parents, leaf = path.split(".")
        target = result
        for parent in parents:
            target = target.setdefault(parent, {})
        if op == "remove":
            target.pop(leaf, None)
        elif op == "add" and isinstance(target.get(leaf), list) and isinstance(value, list):
            target[leaf] = target[leaf] + value
        elif op in ("add", "replace"):
            target[leaf] = value
        else:
            raise ValueError(f"unsupported operation {op!r}")
    return result


BULK_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:BulkResponse"
BULK_LIMITS = {"maxOperations": 1000, "maxPayloadSize": 1 << 20}


class Operation:
    """One Bulk operation made to look like a request to the handlers above."""

    def __init__(self, request: web.Request, method: str, path: str, data: Any) -> None:
        self.method = method
        self.headers = request.headers
        self.url = request.url
        self.body = orjson.dumps(data) if data is not None else b""
        found = PATHS.match(request.match_info["tenant"] + "/v2" + path)
        if found is None or not found.group("type"):
            raise ValueError(f"no resource at {path}")
        self.match_info = {k: v or "" for k, v in found.groupdict().items()}

    async def read(self) -> bytes:
        return self.body


class Store:
    def __init__(self, token: str, latency: float = 0.0, *, bulk: bool = True) -> None:
        self.auth = f"Bearer {token}"
        self.latency = latency
        self.bulk = bulk
        self.tenants: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        self.names: dict[str, dict[str, str]] = {}
        """Per tenant: userName -> the user holding it (uniqueness without a scan)."""
        self.name_of: dict[str, dict[str, str]] = {}
        """Per tenant: user -> its userName."""

    def resources(self, request: web.Request) -> dict[str, dict[str, Any]]:
        tenant = self.tenants.setdefault(request.match_info["tenant"], {"Users": {}, "Groups": {}})
        return tenant[request.match_info["type"]]

    def hold_name(self, request: web.Request, rid: str, name: Any) -> bool:
        """Give ``name`` to user ``rid`` (dropping its old one); False if another user holds it."""
        if request.match_info["type"] != "Users":
            return True
        names = self.names.setdefault(request.match_info["tenant"], {})
        owned = self.name_of.setdefault(request.match_info["tenant"], {})
        if name is not None and names.get(name, rid) != rid:
            return False
        old = owned.pop(rid, None)
        if old is not None:
            del names[old]
        if name is not None:
            names[name], owned[rid] = rid, name
        return True

    def stamped(self, request: web.Request, resource: dict[str, Any], rid: str) -> dict[str, Any]:
        now = datetime.now(UTC).isoformat()
        kind = request.match_info["type"]
        meta = dict(resource.get("meta") or {})
        meta.setdefault("created", now)
        meta.update(
            resourceType=TYPES[kind],
            lastModified=now,
            location=f"{request.url.origin()}{request.match_info['tenant']}/v2/{kind}/{rid}",
            version=f'W/"{uuid.uuid4().hex[:8]}"',
        )
        return {**resource, "id": rid, "meta": meta}

    @web.middleware
    async def guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != self.auth:
            return error(401, "bad token")
        if self.latency:
            await asyncio.sleep(self.latency)
        try:
            return await handler(request)
        except ValueError as exc:
            return error(400, str(exc), "invalidFilter")

    async def create(self, request: web.Request) -> web.Response:
        resources = self.resources(request)
        body = orjson.loads(await request.read())
        rid = uuid.uuid4().hex
        if not self.hold_name(request, rid, body.get("userName")):
            return error(409, f"userName {body.get('userName')} is taken", "uniqueness")
        resources[rid] = self.stamped(request, body, rid)
        return answer(resources[rid], 201)

    async def one(self, request: web.Request) -> web.Response:
        resources = self.resources(request)
        rid = request.match_info["id"]
        if rid not in resources:
            return error(404, f"{rid} not found")
        if request.method == "GET":
            return answer(resources[rid])
        if request.method == "DELETE":
            del resources[rid]
            self.hold_name(request, rid, None)
            return web.Response(status=204)
        body = orjson.loads(await request.read())
        if request.method == "PUT":
            updated = body
        else:
            updated = patched(resources[rid], body.get("Operations") or [])
        if not self.hold_name(request, rid, updated.get("userName")):
            return error(409, f"userName {updated.get('userName')} is taken", "uniqueness")
        resources[rid] = self.stamped(request, {**updated, "meta": resources[rid]["meta"]}, rid)
        return answer(resources[rid])

    async def listing(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            query = orjson.loads(await request.read())
        else:
            query = dict(request.query)
        wanted = query.get("filter")
        start = max(1, int(query.get("startIndex") or 1))
        resources = self.resources(request)
        if wanted:
            candidates = by_id(resources, wanted)
            found = [
                r
                for r in (resources.values() if candidates is None else candidates)
                if matches(r, wanted)
            ]
            total, rest = len(found), iter(found)
        else:
            # No filter: a page without a list of every resource (a peer of 100,000 users is
            # read a page at a time, so a copy of them all per page would be quadratic).
            total, rest = len(resources), iter(resources.values())
        count = int(query.get("count") or total)
        page = list(itertools.islice(rest, start - 1, start - 1 + max(0, count)))
        return answer(
            {
                "schemas": [LIST],
                "totalResults": total,
                "startIndex": start,
                "itemsPerPage": len(page),
                "Resources": page,
            }
        )

    async def load(self, request: web.Request) -> web.Response:
        """``{"template": USER, "prefix": P, "count": N}``: N users like USER, the n-th (from 0)
        named ``P-n`` with n in 7 digits; userNames already held are refused before any is made.
        Answers how many the tenant holds."""
        body = orjson.loads(await request.read())
        template, prefix, count = body["template"], str(body["prefix"]), int(body["count"])
        names = [f"{prefix}-{n:07d}" for n in range(count)]
        taken = self.names.get(request.match_info["tenant"], {})
        clash = next((name for name in names if name in taken), None)
        if clash is not None:
            return error(409, f"userName {clash} is taken", "uniqueness")
        resources = self.resources(request)
        for name in names:
            rid = uuid.uuid4().hex
            self.hold_name(request, rid, name)
            resources[rid] = self.stamped(request, {**template, "userName": name}, rid)
        return answer({"totalResults": len(resources)})

    async def bulk_request(self, request: web.Request) -> web.Response:
        """RFC 7644 section 3.7: the operations in order, each answered as its own request."""
        if not self.bulk:
            return error(404, "no endpoint /Bulk")
        body = orjson.loads(await request.read())
        operations = body.get("Operations") or []
        if len(operations) > BULK_LIMITS["maxOperations"]:
            return error(413, "too many operations", "tooMany")
        results = []
        for operation in operations:
            method, path = str(operation.get("method", "")).upper(), operation.get("path", "")
            try:
                fake: Any = Operation(request, method, path, operation.get("data"))
            except ValueError as exc:
                results.append(
                    {"method": method, "status": "400", "response": {"detail": str(exc)}}
                )
                continue
            if method == "POST" and not fake.match_info["id"]:
                answered = await self.create(fake)
            else:
                answered = await self.one(fake)
            result: dict[str, Any] = {"method": method, "status": str(answered.status)}
            if "bulkId" in operation:
                result["bulkId"] = operation["bulkId"]
            document = orjson.loads(answered.body) if answered.body else None
            if answered.status >= 400:
                result["response"] = document
            elif isinstance(document, dict):
                result["location"] = document["meta"]["location"]
                result["version"] = document["meta"]["version"]
            results.append(result)
        return answer({"schemas": [BULK_RESPONSE], "Operations": results})

    async def discovery(self, request: web.Request) -> web.Response:
        what = request.match_info["what"]
        if what == "ServiceProviderConfig":
            return answer(
                {
                    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
                    "patch": {"supported": True},
                    "bulk": {"supported": self.bulk, **BULK_LIMITS}
                    if self.bulk
                    else {"supported": False, "maxOperations": 0, "maxPayloadSize": 0},
                    "filter": {"supported": True, "maxResults": 100000},
                    "changePassword": {"supported": False},
                    "sort": {"supported": False},
                    "etag": {"supported": True},
                    "authenticationSchemes": [],
                }
            )
        if what == "ResourceTypes":
            types = [
                {
                    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
                    "id": name,
                    "name": name,
                    "endpoint": f"/{endpoint}",
                    "schema": f"urn:ietf:params:scim:schemas:core:2.0:{name}",
                }
                for endpoint, name in TYPES.items()
            ]
            return answer({"schemas": [LIST], "totalResults": 2, "Resources": types})
        # No schemas: the broker then uses the references RFC 7643 defines.
        return answer({"schemas": [LIST], "totalResults": 0, "Resources": []})


PATHS = re.compile(
    r"^(?P<tenant>(?:/[\w-]+)?)/v2/(?:"
    r"(?P<what>ServiceProviderConfig|ResourceTypes|Schemas)|(?P<bulk>Bulk)"
    r"|(?P<type>Users|Groups)(?:/(?P<id>[^/]+))?)$"
)


def app(token: str, latency: float = 0.0, *, bulk: bool = True) -> web.Application:
    store = Store(token, latency, bulk=bulk)

    async def dispatch(request: web.Request) -> web.StreamResponse:
        found = PATHS.match(request.path)
        if found is None:
            return error(404, f"no endpoint {request.path}")
        parts = found.groupdict()
        request.match_info.update({k: v or "" for k, v in parts.items()})
        if parts["what"]:
            return await store.discovery(request)
        if parts["bulk"]:
            if request.method != "POST":
                return error(405, "Bulk takes POST")
            return await store.bulk_request(request)
        if parts["id"] == ".search" and request.method == "POST":
            return await store.listing(request)
        if parts["id"] == ".load" and parts["type"] == "Users" and request.method == "POST":
            return await store.load(request)
        if parts["id"]:
            return await store.one(request)
        if request.method == "POST":
            return await store.create(request)
        return await store.listing(request)

    application = web.Application(middlewares=[store.guard])
    application.router.add_route("*", "/{path:.*}", dispatch)
    return application


if __name__ == "__main__":
    flags = {a for a in sys.argv[1:] if a.startswith("--")}
    argv = [a for a in sys.argv[1:] if not a.startswith("--")]
    web.run_app(
        app(argv[1], float(argv[2]) if len(argv) > 2 else 0.0, bulk="--no-bulk" not in flags),
        host="127.0.0.1",
        port=int(argv[0]),
        print=None,
        access_log=None,
    )
