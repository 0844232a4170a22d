"""The SET endpoints: polling (RFC 8936) and the JWKS on the domain-facing listener, and the
receiver of SETs the home pushes (RFC 8935) on the admin listener."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from broker.db import listening, query
from broker.errors import BrokerError, InvalidValueError
from broker.events.keyring import KeyRing
from broker.events.render import EventRenderer
from broker.responses import DATABASE_DOWN
from broker.scim.canonical import parse_body
from broker.tokens import TokenStore

__all__ = ["EventWaiters", "Poll", "jwks_handler", "set_error", "set_errors"]

log = logging.getLogger(__name__)


def set_error(status: int, err: str, description: str) -> web.Response:
    """An error as RFC 8935 section 2.4 and RFC 8936 section 2.4 shape it."""
    return web.json_response({"err": err, "description": description}, status=status)


_ERR_BY_STATUS = {401: "authentication_failed", 403: "access_denied"}


def set_errors(
    handler: Callable[[Any, web.Request], Awaitable[web.Response]],
) -> Callable[[Any, web.Request], Awaitable[web.Response]]:
    """The broker's errors (a bad token, a missing scope, the database down) in the error shape
    of RFC 8935 and RFC 8936, with the status they carry."""

    @functools.wraps(handler)
    async def handle(self: Any, request: web.Request) -> web.Response:
        try:
            return await handler(self, request)
        except BrokerError as exc:
            response = set_error(
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

    def forget(self, domain_id: str = "") -> None:
        """Check the tokens of ``domain_id`` (all with "") afresh: it changed (disabled,
        removed)."""
        if self._tokens is not None:
            self._tokens.forget(domain_id)

    @set_errors
    async def handle(self, request: web.Request) -> web.Response:
        if self._tokens is None:
            self._tokens = TokenStore(self.pool)
        principal = await self._tokens.authenticate(request.headers.get("Authorization"))
        principal.require("scim:read")
        domain = principal.domain_id
        try:
            body = parse_body(await request.read() or b"{}")
        except InvalidValueError as exc:
            return set_error(400, "invalid_request", f"the poll request: {exc.detail}")
        problem = _check_poll(body)
        if problem:
            return set_error(400, "invalid_request", problem)
        if not await self.pool.fetchval(query("subscription_exists"), domain):
            return set_error(
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
                # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancel that
                # arrives as the waiter is woken, and the shutdown would wait for this poll.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, self.RECHECK)):
                        await woken.wait()
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
