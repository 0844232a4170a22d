"""The SET endpoints: polling (RFC 8936) and the JWKS on the domain-facing listener, and the
receiver of SETs the home pushes (RFC 8935) on the admin listener."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from broker.db import listening, query
from broker.domains import DomainStore
from broker.errors import BrokerError, InvalidValueError
from broker.events.keyring import KeyRing
from broker.events.keys import SetError, verify_set
from broker.events.render import EventRenderer
from broker.home import HomeClient
from broker.http import SET_TYPE
from broker.propagation.outbox import enqueue_changes
from broker.responses import DATABASE_DOWN
from broker.scim.canonical import parse_body
from broker.tokens import TokenStore

__all__ = ["EventWaiters", "HomeReceiver", "Poll", "jwks_handler"]

log = logging.getLogger(__name__)

# RFC 9967 event URIs end in the kind, possibly followed by :notice or :full.
_KINDS = ("create", "put", "patch", "delete", "activate", "deactivate")


def _set_error(status: int, err: str, description: str) -> web.Response:
    """An error as RFC 8935 section 2.4 and RFC 8936 section 2.4 shape it."""
    return web.json_response({"err": err, "description": description}, status=status)


_ERR_BY_STATUS = {401: "authentication_failed", 403: "access_denied"}


def _set_errors(
    handler: Callable[[Any, web.Request], Awaitable[web.Response]],
) -> Callable[[Any, web.Request], Awaitable[web.Response]]:
    """The broker's errors (a bad token, a missing scope, the database down) in the error shape
    of RFC 8935 and RFC 8936, with the status they carry."""

    @functools.wraps(handler)
    async def handle(self: Any, request: web.Request) -> web.Response:
        try:
            return await handler(self, request)
        except BrokerError as exc:
            response = _set_error(
                exc.status, _ERR_BY_STATUS.get(exc.status, "invalid_request"), exc.detail
            )
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="scim-id-broker"'
            return response
        except DATABASE_DOWN as exc:
            log.warning("SET endpoint: the database is unreachable: %s", exc)
            return web.json_response(
                {"err": "temporarily_unavailable", "description": "try again shortly"},
                status=503,
                headers={"Retry-After": "5"},
            )

    return handle


class EventWaiters:
    """Long polls waiting for a domain's next SET, woken by NOTIFY on ``broker_events``."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}

    @contextlib.asynccontextmanager
    async def listen(self, url: str) -> AsyncIterator[None]:
        async with listening(url, "broker_events", self.wake, on_up=self.wake_all):
            yield

    def wake(self, domain: str) -> None:
        for event in self._waiting.get(domain, ()):
            event.set()

    def wake_all(self) -> None:
        for domain in list(self._waiting):
            self.wake(domain)

    @contextlib.contextmanager
    def waiter(self, domain: str) -> Any:
        event = asyncio.Event()
        self._waiting.setdefault(domain, set()).add(event)
        try:
            yield event
        finally:
            self._waiting[domain].discard(event)
            if not self._waiting[domain]:
                del self._waiting[domain]


class Poll:
    """``POST /events/poll``: acknowledge, report errors, and get the next SETs (RFC 8936)."""

    # Without a notification a waiting poll still looks again this often (seconds).
    RECHECK = 1.0

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        renderer: Callable[[], EventRenderer],
        waiters: EventWaiters,
        *,
        long_poll_max: float,
        max_events: int,
    ) -> None:
        self._pool = pool
        self._tokens: TokenStore | None = None
        self.renderer = renderer
        self.waiters = waiters
        self.long_poll_max = long_poll_max
        self.max_events = max_events

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool()

    @_set_errors
    async def handle(self, request: web.Request) -> web.Response:
        if self._tokens is None:
            self._tokens = TokenStore(self.pool)
        principal = await self._tokens.authenticate(request.headers.get("Authorization"))
        principal.require("scim:read")
        domain = principal.domain_id
        try:
            body = parse_body(await request.read() or b"{}")
        except InvalidValueError as exc:
            return _set_error(400, "invalid_request", f"the poll request: {exc.detail}")
        problem = _check_poll(body)
        if problem:
            return _set_error(400, "invalid_request", problem)
        if not await self.pool.fetchval(query("subscription_exists"), domain):
            return _set_error(
                400,
                "invalid_request",
                f"domain {domain} has no event subscription: ask the broker's operator for one "
                f"(broker events subscribe {domain} --delivery poll)",
            )
        async with self.pool.acquire() as conn, conn.transaction():
            if body.get("ack"):
                await conn.execute(query("events_acknowledged"), domain, body["ack"])
            if body.get("setErrs"):
                errors = [
                    {"jti": jti, "err": e.get("err"), "description": e.get("description")}
                    for jti, e in body["setErrs"].items()
                ]
                await conn.execute(query("events_refused"), domain, errors)
        wanted = min(int(body.get("maxEvents", self.max_events)), self.max_events)
        immediately = bool(body.get("returnImmediately", False)) or wanted == 0
        deadline = time.monotonic() + self.long_poll_max
        while True:
            with self.waiters.waiter(domain) as woken:
                sets = await self.renderer().render(domain, limit=wanted) if wanted else []
                left = deadline - time.monotonic()
                if sets or immediately or left <= 0:
                    break
                if await self.pool.fetchval(query("more_events"), domain, 0):
                    continue  # a whole batch was out of scope: the next one, at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(left, self.RECHECK))
        if sets:
            await self.pool.execute(query("events_sent"), domain, [s.id for s in sets])
        more = (
            await self.pool.fetchval(query("more_events"), domain, sets[-1].id if sets else 0)
            if wanted
            else False
        )
        return web.json_response(
            {"sets": {s.jti: s.token for s in sets}, "moreAvailable": bool(more)}
        )


def _check_poll(body: Any) -> str | None:
    """What is wrong with a poll request, in words the caller can act on; None if nothing."""
    if not isinstance(body, dict):
        return "the poll request is a JSON object (RFC 8936 section 2.4)"
    ack = body.get("ack", [])
    if not isinstance(ack, list) or not all(isinstance(j, str) for j in ack):
        return '"ack" is a list of the jti values of the SETs received'
    errs = body.get("setErrs", {})
    if not isinstance(errs, dict) or not all(isinstance(e, dict) for e in errs.values()):
        return '"setErrs" maps a jti to {"err": ..., "description": ...}'
    wanted = body.get("maxEvents", 0)
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 0:
        return '"maxEvents" is a number of SETs, 0 or more'
    if not isinstance(body.get("returnImmediately", False), bool):
        return '"returnImmediately" is true or false'
    return None


def jwks_handler(keys: Callable[[], KeyRing]) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.Response:
        body = await keys().jwks()
        return web.Response(
            body=orjson.dumps(body),
            content_type="application/jwk-set+json",
            headers={"Cache-Control": "max-age=60"},
        )

    return handle


class HomeReceiver:
    """``POST {admin}/home/events``: SETs the home pushes about its own changes (RFC 8935),
    checked against the home's JWKS, each turned into propagation work and SETs for the
    domains (home's state is read afresh: the SET says what to look at, not what to believe)."""

    JWKS_TTL = 300.0

    def __init__(
        self,
        pool: asyncpg.Pool,
        tokens: TokenStore,
        home: HomeClient,
        session: aiohttp.ClientSession,
        *,
        jwks_url: str,
        issuer: str | None,
    ) -> None:
        self.pool = pool
        self.tokens = tokens
        self.domains = DomainStore(pool)
        self.home = home
        self.session = session
        self.jwks_url = jwks_url
        self.issuer = issuer
        self._jwks: tuple[float, dict[str, Any]] | None = None

    @_set_errors
    async def handle(self, request: web.Request) -> web.Response:
        principal = await self.tokens.authenticate(request.headers.get("Authorization"))
        if (await self.domains.get(principal.domain_id)).kind != "home":
            return _set_error(
                403, "access_denied", "only the home domain's token may push SETs here"
            )
        principal.require("scim:write")
        if request.content_type != SET_TYPE:
            return _set_error(
                400, "invalid_request", f"send the SET as {SET_TYPE} (RFC 8935 section 2.2)"
            )
        token = (await request.text()).strip()
        try:
            claims = await self._verify(token)
            changed, deleted, verbs = await self._changes(claims)
        except SetError as exc:
            log.warning("home SET refused: %s: %s", exc.err, exc)
            return _set_error(400, exc.err, str(exc))
        documents = await self._documents(changed, deleted)
        async with self.pool.acquire() as conn, conn.transaction():
            await enqueue_changes(conn, changed, deleted=deleted, verb=verbs, documents=documents)
        return web.Response(status=202)

    async def _verify(self, token: str) -> dict[str, Any]:
        key_set = await self._key_set(refresh=False)
        try:
            return verify_set(token, key_set, issuer=self.issuer)
        except SetError as exc:
            if exc.err != "invalid_key":
                raise
        # A key the broker has not seen: the home may have rotated; look once more.
        return verify_set(token, await self._key_set(refresh=True), issuer=self.issuer)

    async def _key_set(self, *, refresh: bool) -> dict[str, Any]:
        now = time.monotonic()
        if not refresh and self._jwks is not None and now - self._jwks[0] < self.JWKS_TTL:
            return self._jwks[1]
        try:
            async with self.session.get(self.jwks_url, allow_redirects=False) as answer:
                if answer.status != 200:
                    raise SetError("invalid_key", f"the home's JWKS answered HTTP {answer.status}")
                key_set: dict[str, Any] = orjson.loads(await answer.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise SetError("invalid_key", f"the home's JWKS could not be read: {exc}") from exc
        self._jwks = (now, key_set)
        return key_set

    async def _changes(
        self, claims: Mapping[str, Any]
    ) -> tuple[dict[str, str], list[str], dict[str, str]]:
        sub_id = claims.get("sub_id")
        uri = sub_id.get("uri") if isinstance(sub_id, dict) else None
        schema = await self.home.schema()
        parsed = schema.endpoints.parse_uri(uri, "") if isinstance(uri, str) else None
        if parsed is None:
            raise SetError(
                "invalid_request", 'the SET needs a sub_id of format "scim" naming a resource URI'
            )
        resource_type, internal_id = parsed
        kinds = {_kind(uri) for uri in claims.get("events", {})} - {None}
        if not kinds:
            raise SetError("invalid_request", "the SET carries no SCIM provisioning event")
        if "delete" in kinds:
            return {}, [internal_id], {}
        verb = next((k for k in ("create", "put", "patch") if k in kinds), "patch")
        return {internal_id: resource_type}, [], {internal_id: verb}

    async def _documents(
        self, changed: dict[str, str], deleted: list[str]
    ) -> dict[str, dict[str, Any]]:
        """Home's current resources (a resource home no longer has is deleted)."""
        schema = await self.home.schema()
        found: dict[str, dict[str, Any]] = {}
        for internal_id, resource_type in list(changed.items()):
            endpoint = schema.endpoints.by_type[resource_type]
            response = await self.home.request("GET", f"{endpoint}/{internal_id}")
            if response.status == 404:
                del changed[internal_id]
                deleted.append(internal_id)
            elif response.status == 200 and isinstance(response.body, dict):
                found[internal_id] = response.body
        return found


def _kind(uri: str) -> str | None:
    parts = uri.split(":")
    for kind in _KINDS:
        if kind in parts and "prov" in parts:
            return kind
    return None
