"""Dead letters in bulk on the admin API: count those toward one peer, then retry or discard them
all, or those that died since a moment (``broker deliveries retry|discard --domain D``).

- ``GET /admin/domains/{domain}/dead-letters[?since=T]``: ``{"domain", "since", "count"}``.
- ``POST /admin/domains/{domain}/dead-letters/retry`` (or ``/discard``) with ``{"all": true}``
  or ``{"since": T}`` (ISO 8601 or a time ago: ``30m``, ``2h``, ``7d``), and optionally
  ``"expected": N``, the count the caller confirmed: refused with 409 when it has changed.
  Answers ``{"domain", "action", "since", "count"}``; audited batch by batch.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
import orjson
from aiohttp import web

from broker.errors import InvalidValueError
from broker.propagation.outbox import (
    DeadLetters,
    check_expected,
    count_dead_letters,
    dead_letter_window,
    settle_dead_letters,
)
from broker.tokens import TokenStore

__all__ = ["register"]


def _letters_json(letters: DeadLetters) -> dict[str, Any]:
    return {
        "domain": letters.domain,
        "since": letters.since.isoformat() if letters.since else None,
        "count": letters.count,
    }


class DeadLetterRoutes:
    def __init__(self, pool: asyncpg.Pool, tokens: TokenStore) -> None:
        self.pool = pool
        self.tokens = tokens

    async def _actor(self, request: web.Request) -> str:
        principal = await self.tokens.authenticate(request.headers.get("Authorization"))
        principal.require("admin")
        return principal.domain_id

    async def count(self, request: web.Request) -> web.Response:
        await self._actor(request)
        since = request.query.get("since")
        window = dead_letter_window(everything=since is None, since=since, now=datetime.now(UTC))
        letters = await count_dead_letters(self.pool, request.match_info["domain"], window)
        return web.json_response(_letters_json(letters))

    async def settle(self, request: web.Request) -> web.Response:
        actor = await self._actor(request)
        body = await _body(request)
        everything, since = body.get("all", False), body.get("since")
        if not isinstance(everything, bool) or not (since is None or isinstance(since, str)):
            raise InvalidValueError('"all" is true or false, "since" a time such as "2h"')
        expected = body.get("expected")
        if expected is not None and (not isinstance(expected, int) or isinstance(expected, bool)):
            raise InvalidValueError('"expected" is the count the caller confirmed: a number')
        window = dead_letter_window(everything=everything, since=since, now=datetime.now(UTC))
        letters = await count_dead_letters(self.pool, request.match_info["domain"], window)
        check_expected(letters, expected, "count them again (GET this path without the action)")
        action: Literal["retry", "discard"] = (
            "retry" if request.match_info["action"] == "retry" else "discard"
        )
        settled = await settle_dead_letters(self.pool, letters, action, actor)
        return web.json_response(
            {
                **_letters_json(letters),
                "action": action,
                "count": settled.count,
                "superseded": settled.superseded,
                "passwordsLost": settled.passwords_lost,
            }
        )


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        raise InvalidValueError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidValueError('the request body is a JSON object: {"all": true} or {"since": T}')
    return body


def register(app: web.Application, pool: asyncpg.Pool, tokens: TokenStore) -> None:
    """The bulk dead-letter routes on the admin listener's application (admin tokens)."""
    routes = DeadLetterRoutes(pool, tokens)
    app.router.add_get("/admin/domains/{domain}/dead-letters", routes.count)
    app.router.add_post(
        r"/admin/domains/{domain}/dead-letters/{action:retry|discard}", routes.settle
    )
