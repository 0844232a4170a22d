"""The admin API's history of one entity and dry runs of merges and splits (for the console).

- ``GET /admin/entities/{entity}/history[?since=T&limit=N]``: what ``broker history`` lists
  (``{entity}`` is an internal ID or ``DOMAIN:EXTERNAL_ID``).
- ``POST /admin/merges/dry-run`` and ``POST /admin/splits/dry-run`` (or ``POST /admin/merges``
  and ``/admin/splits`` with ``?dry_run=true`` or ``"dry_run": true`` in the body): the body of
  a merge or split; the answer is the mapping table before and after and each peer's tasks, and
  nothing changes (no idempotency key is needed).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp import web

from broker.admin.bodies import json_object, split_moves, text, texts
from broker.errors import InvalidValueError
from broker.history import entity_history
from broker.mapping.render import plan_json
from broker.mapping.store import MappingStore, merge_planner, split_planner
from broker.tokens import TokenStore

__all__ = ["dry_run", "merge_dry_run", "register", "split_dry_run"]


async def _authorize(tokens: TokenStore, request: web.Request) -> None:
    principal = await tokens.authenticate(request.headers.get("Authorization"))
    principal.require("admin")


def _since(request: web.Request) -> datetime | None:
    text = request.query.get("since")
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidValueError(
            f"since={text}: an ISO 8601 time, for example 2026-12-01T08:00:00Z"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _limit(request: web.Request) -> int:
    text = request.query.get("limit", "1000")
    if not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise InvalidValueError(f"limit={text}: a whole number from 1 to 100000")
    return int(text)


def dry_run(request: web.Request, body: dict[str, Any]) -> bool:
    """Whether a merge or split request asks for a dry run: ``?dry_run=true`` or
    ``"dry_run": true`` in the body."""
    return request.query.get("dry_run", "").lower() in ("1", "true") or body.get("dry_run") is True


async def merge_dry_run(store: MappingStore, body: dict[str, Any]) -> web.Response:
    """A merge's body planned, nothing changed: the rows before and after, each peer's tasks."""
    survivor, losers = text(body, "survivor"), texts(body, "losers")
    preview = await store.preview([survivor, *losers], merge_planner(survivor, losers))
    return web.json_response(plan_json(preview.before, preview.after, preview.plan))


async def split_dry_run(store: MappingStore, body: dict[str, Any]) -> web.Response:
    """A split's body planned, nothing changed (a split-off home created is not recorded)."""
    source, new = text(body, "source"), texts(body, "new")
    provision = body.get("provision", "on_demand")
    if provision not in ("eager", "on_demand"):
        raise InvalidValueError('"provision" is "eager" or "on_demand"')
    moves = split_moves(new, body.get("move", {}))
    preview = await store.preview([source, *moves], split_planner(source, moves, provision))
    return web.json_response(plan_json(preview.before, preview.after, preview.plan))


def register(
    app: web.Application, *, pool: asyncpg.Pool, store: MappingStore, tokens: TokenStore
) -> None:
    """The routes, on the admin listener's application."""

    async def history(request: web.Request) -> web.Response:
        await _authorize(tokens, request)
        found = await entity_history(
            pool,
            request.match_info["entity"],
            since=_since(request),
            limit=_limit(request),
        )
        return web.json_response(found.to_json())

    async def merge(request: web.Request) -> web.Response:
        await _authorize(tokens, request)
        return await merge_dry_run(store, await json_object(request))

    async def split(request: web.Request) -> web.Response:
        await _authorize(tokens, request)
        return await split_dry_run(store, await json_object(request))

    app.router.add_get("/admin/entities/{entity}/history", history)
    app.router.add_post("/admin/merges/dry-run", merge)
    app.router.add_post("/admin/splits/dry-run", split)
