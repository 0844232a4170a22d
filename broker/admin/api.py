"""The admin listener (``[server] admin_host:admin_port``): the admin API for operators, and the
home-facing SCIM endpoint through which home's own tools write so that peers follow at once.

- ``/admin/...`` needs a token with the ``admin`` scope.
- ``/home/scim/v2/...`` needs a token of the home domain (``domain add NAME --home``); requests
  are forwarded to home unchanged (home's tools speak home's IDs), and every successful write
  enqueues the syncs it implies toward the push peers. A write whose enqueue is lost (the broker
  stopped in between) is still found by the home poller.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import asyncpg
import orjson
from aiohttp import web

from broker.admin import deadletters, domains, history, provision, reconcile
from broker.admin.bodies import json_object as _json_object
from broker.admin.bodies import split_moves
from broker.admin.bodies import text as _text
from broker.admin.bodies import texts as _texts
from broker.credentials import NOTHING_RESERVED, Reserved
from broker.db import query
from broker.domains import DomainStore
from broker.errors import BrokerError, ForbiddenError, InvalidValueError, NotFoundError
from broker.home import HomeClient
from broker.mapping.store import MappingStore, Operation
from broker.propagation.journal import Journal
from broker.propagation.outbox import settle_dead_letter
from broker.propagation.writes import HomeWrite
from broker.responses import MAX_BODY, answer_errors
from broker.scim.rewrite import Endpoints
from broker.tokens import TokenStore

if TYPE_CHECKING:
    from broker.admin.reconcile import ReconcilerFactory
    from broker.propagation.receiver import HomeReceiver

__all__ = [
    "create_admin_app",
    "delivery_json",
    "home_path",
    "operation_json",
    "queue_json",
    "split_moves",
]

HOME_PREFIX = "/home/scim/v2"
_WRITES = {"POST", "PUT", "PATCH", "DELETE"}


# Service endpoints of RFC 7644 section 3.2 besides the resource types: with the resource
# name (Schemas, ResourceTypes) or alone.
_NAMED = frozenset({"Schemas", "ResourceTypes"})
_ALONE = frozenset({"ServiceProviderConfig", "Bulk", ".search"})
_PCHAR = "-._~!$&'()*+,;=:@"


def home_path(raw_path: str, endpoints: Endpoints) -> str:
    """The path below the home's SCIM base that ``raw_path`` (the request target as it came,
    still percent-encoded) names, encoded again for the call to home; NotFoundError when it
    names anything outside the home's SCIM endpoints.

    Refused: an encoded ``/``, ``?`` or ``#``, a ``..`` or ``.`` segment (encoded or not), a
    NUL or other control character, an empty segment, an endpoint home does not have, more
    than ``/Endpoint/id``. Otherwise a path such as ``/Users/..%2F..%2Fadmin`` would reach
    another path of the home's server once the client library resolves the dots."""
    path = raw_path.split("?", 1)[0]
    prefix = HOME_PREFIX + "/"
    if not path.startswith(prefix):
        raise NotFoundError(f"not a SCIM endpoint of the home: use {prefix}Users and the like")
    segments = []
    for raw in path[len(prefix) :].split("/"):
        try:
            segment = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise NotFoundError("the path is not UTF-8 once decoded") from None
        if (
            not segment
            or segment in (".", "..")
            or any(c in "/?#\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in segment)
        ):
            raise NotFoundError(
                f"{HOME_PREFIX}/ takes /Endpoint or /Endpoint/id only: no empty, '.' or '..' "
                "segment, no encoded '/', '?' or '#', no control character"
            )
        segments.append(segment)
    first, rest = segments[0], segments[1:]
    if first in _ALONE:
        allowed = not rest
    elif first in _NAMED:
        allowed = len(rest) <= 1
    else:
        allowed = endpoints.type_of(first) is not None and len(rest) <= 1
    if not allowed:
        raise NotFoundError(f"no such SCIM endpoint of the home: {'/'.join(segments)[:100]}")
    return "".join("/" + quote(segment, safe=_PCHAR) for segment in segments)


def queue_json(record: asyncpg.Record) -> dict[str, Any]:
    """A peer's queue: depth, oldest age, delivery rate, quarantine state."""
    return {
        "domain": record["id"],
        "status": record["status"],
        "quarantined": record["status"] == "quarantined",
        "failing_since": _iso(record["failing_since"]),
        "last_delivery_at": _iso(record["last_delivery_at"]),
        "depth": record["depth"],
        "in_flight": record["in_flight"],
        "dead_letters": record["dead"],
        "oldest_age_seconds": float(record["oldest_age_seconds"] or 0),
        "delivered_last_minute": record["delivered_last_minute"],
    }


def delivery_json(record: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": record["id"],
        "domain": record["domain_id"],
        "entity": record["internal_id"],
        "operation": str(record["operation_id"]) if record["operation_id"] else None,
        "kind": record["kind"],
        "state": record["state"],
        "attempts": record["attempts"],
        "next_attempt_at": _iso(record["next_attempt_at"]),
        "last_error": record["last_error"],
        "created_at": _iso(record["created_at"]),
        "updated_at": _iso(record["updated_at"]),
    }


def operation_json(operation: Operation, request: web.Request | None = None) -> dict[str, Any]:
    """An operation's status resource: its state, and per domain its progress and reasons."""
    path = f"/admin/operations/{operation.id}"
    return {
        "id": str(operation.id),
        "kind": operation.kind,
        "state": operation.state,
        "request": operation.request,
        "progress": operation.progress,
        "actor": operation.actor,
        "replayed": operation.replayed,
        "created_at": _iso(operation.created_at),
        "updated_at": _iso(operation.updated_at),
        "location": f"{request.scheme}://{request.host}{path}" if request else path,
    }


def _iso(moment: Any) -> str | None:
    return moment.isoformat() if moment is not None else None


class Admin:
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: MappingStore,
        home: HomeClient | None,
        journal: Journal,
    ) -> None:
        self.pool = pool
        self.store = store
        self.home = home
        self.journal = journal
        self.tokens = TokenStore(pool)
        self.domains = DomainStore(pool)

    async def authorize(self, request: web.Request) -> str:
        """The admin's domain, when the request carries a token with the ``admin`` scope."""
        return await self._admin(request)

    async def _admin(self, request: web.Request) -> str:
        principal = await self.tokens.authenticate(request.headers.get("Authorization"))
        principal.require("admin")
        return principal.domain_id

    # ------------------------------------------------------------------ queues and dead letters

    async def queue(self, request: web.Request) -> web.Response:
        await self._admin(request)
        domain = await self.domains.get(request.match_info["domain"])
        record = await self.pool.fetchrow(query("queue_stats"), domain.id)
        assert record is not None, "the domain exists"
        return web.json_response(queue_json(record))

    async def deliveries(self, request: web.Request) -> web.Response:
        await self._admin(request)
        state = request.query.get("state")
        if state is not None and state not in ("pending", "in_flight", "done", "dead", "cancelled"):
            raise InvalidValueError(
                "state must be one of pending, in_flight, done, dead, cancelled"
            )
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise InvalidValueError("limit must be a whole number") from None
        records = await self.pool.fetch(
            query("list_deliveries"), request.query.get("domain"), state, max(1, min(limit, 1000))
        )
        return web.json_response({"deliveries": [delivery_json(r) for r in records]})

    async def act(self, request: web.Request) -> web.Response:
        actor = await self._admin(request)
        action = request.match_info["action"]
        try:
            delivery_id = int(request.match_info["id"])
        except ValueError:
            raise NotFoundError("a delivery ID is a number") from None
        record = await settle_dead_letter(
            self.pool, delivery_id, "retry" if action == "retry" else "discard", actor
        )
        return web.json_response(delivery_json(record))

    # ------------------------------------------------------------------ merge and split

    async def merge(self, request: web.Request) -> web.Response:
        actor = await self._admin(request)
        body = await _json_object(request)
        if history.dry_run(request, body):
            return await history.merge_dry_run(self.store, body)
        survivor = _text(body, "survivor")
        losers = _texts(body, "losers")
        operation = await self.store.merge(
            survivor, losers, idempotency_key=_text(body, "idempotency_key"), actor=actor
        )
        return self._accepted(request, operation)

    async def split(self, request: web.Request) -> web.Response:
        actor = await self._admin(request)
        body = await _json_object(request)
        if history.dry_run(request, body):
            return await history.split_dry_run(self.store, body)
        source = _text(body, "source")
        new = _texts(body, "new")
        provision = body.get("provision", "on_demand")
        if provision not in ("eager", "on_demand"):
            raise InvalidValueError('"provision" is "eager" or "on_demand"')
        operation = await self.store.split(
            source,
            split_moves(new, body.get("move", {})),
            idempotency_key=_text(body, "idempotency_key"),
            actor=actor,
            provision=provision,
        )
        return self._accepted(request, operation)

    async def operation(self, request: web.Request) -> web.Response:
        await self._admin(request)
        try:
            op_id = uuid.UUID(request.match_info["op"])
        except ValueError:
            raise NotFoundError("an operation ID is a UUID, as its Location gives it") from None
        return web.json_response(operation_json(await self.store.operation(op_id), request))

    async def operations(self, request: web.Request) -> web.Response:
        await self._admin(request)
        records = await self.pool.fetch(query("recent_operations"), 100)
        return web.json_response(
            {"operations": [operation_json(Operation.from_record(r), request) for r in records]}
        )

    def _accepted(self, request: web.Request, operation: Operation) -> web.Response:
        document = operation_json(operation, request)
        return web.json_response(document, status=202, headers={"Location": document["location"]})

    # ------------------------------------------------------------------ home's own tools

    async def home_scim(self, request: web.Request) -> web.Response:
        principal = await self.tokens.authenticate(request.headers.get("Authorization"))
        # Cached as the domain-facing port caches it (a few seconds): a fresh read per write
        # made the writes queue in front of the broker under load. A write home took that the
        # broker then cannot record (its database gone meanwhile) is a 503 for a change that
        # happened; the home poller still finds it.
        domain = await self.domains.cached(principal.domain_id)
        if domain.kind != "home":
            raise ForbiddenError(
                f"{HOME_PREFIX} is for the home domain's tools; {domain.id} is a peer and "
                "calls /scim/v2 on the broker's main port"
            )
        principal.require("scim:write" if request.method in _WRITES else "scim:read")
        if self.home is None:
            raise BrokerError(
                "set [home] scim_url: the broker has no home to forward to", status=503
            )
        tail = home_path(request.raw_path, (await self.home.schema()).endpoints)
        body = await request.read() if request.can_read_body else b""
        sent = await self.home.forward(request.method, tail, request.query, body)
        if request.method in _WRITES and 200 <= sent.status < 300:
            await self._record(request.method, tail, _json_or_none(body), sent.body)
        headers = {k: v for k, v in sent.headers.items() if k in ("ETag", "Location")}
        return web.Response(
            status=sent.status, body=sent.raw, headers=headers, content_type=sent.content_type
        )

    async def _record(self, method: str, path: str, sent: Any, body: Any) -> None:
        """The entities a successful write touched, and the syncs toward push peers with the
        write-only values (a password) the request ``sent`` set."""
        assert self.home is not None
        schema = await self.home.schema()
        write = HomeWrite.of_home_tool(
            method,
            path,
            sent,
            body,
            endpoints=schema.endpoints,
            home_base=self.home.base_url,
            write_only_names=schema.write_only,
        )
        missing = write.unread()
        if missing and await self.store.events_subscribed():
            # Home answered without the resource (204, or a bulk): read it, for the SETs.
            write = write.with_documents(await self.home.read_back(missing))
        await self.journal.record(write)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    return await answer_errors(request, handler)


def create_admin_app(
    admin: Admin,
    home_events: HomeReceiver | None = None,
    *,
    metrics: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
    reserved: Reserved = NOTHING_RESERVED,
    reconcilers: ReconcilerFactory | None = None,
) -> web.Application:
    """The admin listener's application; with ``home_events``, the receiver of the SETs the
    home pushes at ``/home/events``; with ``metrics``, Prometheus' ``/metrics`` (operational,
    so here and never on the port domains reach); ``reserved``: the broker's own secrets, which
    no domain's credential may name."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
    if metrics is not None:
        app.router.add_get("/metrics", metrics)
    if home_events is not None:
        app.router.add_post("/home/events", home_events.handle)
    app.router.add_get("/admin/domains/{domain}/queue", admin.queue)
    app.router.add_get("/admin/deliveries", admin.deliveries)
    app.router.add_post(r"/admin/deliveries/{id}/{action:retry|discard}", admin.act)
    app.router.add_post("/admin/merges", admin.merge)
    app.router.add_post("/admin/splits", admin.split)
    app.router.add_get("/admin/operations", admin.operations)
    app.router.add_get("/admin/operations/{op}", admin.operation)
    app.router.add_route("*", HOME_PREFIX + "/{tail:.*}", admin.home_scim)
    domains.register(app, admin, reserved)
    deadletters.register(app, admin.pool, admin.tokens)
    provision.register(app, admin)
    history.register(app, pool=admin.pool, store=admin.store, tokens=admin.tokens)
    if reconcilers is not None:
        reconcile.register(app, admin, reconcilers)
    return app


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None
