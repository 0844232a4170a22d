"""Find an identity by internal ID, ``DOMAIN:EXTERNAL_ID``, userName or email (the last two
asked of home), and draw its mapping rows as seed 002 draws the table; with one entity found,
its history (``broker.history``, what ``broker history`` lists) and the account each peer holds
(asked of the peer by its own external ID: ``broker.console.peers``)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from broker.console.context import CONSOLE, Console
from broker.console.core import Lookup, parse_lookup, seed_table
from broker.console.peers import peer_accounts
from broker.console.shell import render
from broker.db import query
from broker.history import entity_history
from broker.home import HomeUnavailable
from broker.mapping.rules import MappingRow

__all__ = ["identity"]

_LIMIT = 20
_HISTORY = 200
"""The newest events of the history shown."""


async def _home_matches(console: Console, lookup: Lookup) -> list[str]:
    """Internal IDs of the users home finds by userName or email (at most 20)."""
    if console.home is None:
        return []
    attribute = "emails.value" if lookup.kind == "email" else "userName"
    answer = await console.home.request(
        "GET",
        "/Users",
        params={
            "filter": f"{attribute} eq {json.dumps(lookup.value)}",
            "count": str(_LIMIT),
            "attributes": "id",
        },
    )
    if answer.status != 200 or not isinstance(answer.body, dict):
        return []
    resources = answer.body.get("Resources") or []
    return [r["id"] for r in resources if isinstance(r, dict) and isinstance(r.get("id"), str)]


async def _home_view(console: Console, entity: Any) -> dict[str, Any] | None:
    """What home holds of the entity (userName, displayName), or None."""
    if console.home is None or entity["state"] != "active":
        return None
    endpoints = (await console.home.schema()).endpoints
    endpoint = endpoints.by_type.get(entity["resource_type"])
    if endpoint is None:
        return None
    answer = await console.home.request("GET", f"{endpoint}/{entity['internal_id']}")
    if answer.status != 200 or not isinstance(answer.body, dict):
        return None
    body = answer.body
    emails = [e.get("value") for e in body.get("emails") or [] if isinstance(e, dict)]
    return {
        "userName": body.get("userName"),
        "displayName": body.get("displayName"),
        "emails": ", ".join(str(e) for e in emails if e),
    }


async def _candidates(console: Console, lookup: Lookup) -> tuple[list[str], str | None]:
    """Internal IDs the search names, and a note when home could not be asked."""
    if lookup.kind == "external":
        assert lookup.domain is not None
        rows = await console.store.rows_by_external(lookup.domain, lookup.value)
        return sorted({r.internal_id for r in rows}), None
    if lookup.kind == "internal":
        if await console.pool.fetchrow(query("console_entity"), lookup.value) is not None:
            return [lookup.value], None
        lookup = Lookup("userName", lookup.value)
    try:
        return await _home_matches(console, lookup), None
    except HomeUnavailable as exc:
        return [], exc.detail


async def _endpoint(console: Console, resource_type: str) -> str | None:
    if console.home is None:
        return None
    try:
        return (await console.home.schema()).endpoints.by_type.get(resource_type)
    except HomeUnavailable:
        return None


async def _describe(console: Console, internal_id: str, *, whole: bool) -> dict[str, Any] | None:
    """The entity's rows, what home holds and its operations; ``whole``: its history and the
    peers' accounts too (only one entity found: each peer is asked)."""
    entity = await console.pool.fetchrow(query("console_entity"), internal_id)
    if entity is None:
        return None
    rows: list[MappingRow] = await console.store.rows_of([internal_id])
    try:
        held = await _home_view(console, entity)
    except HomeUnavailable:
        held = None
    operations = await console.pool.fetch(query("console_operations_of"), internal_id)
    described: dict[str, Any] = {
        "entity": dict(entity),
        "table": seed_table(rows),
        "home": held,
        "operations": [dict(o) for o in operations],
        "history": None,
        "accounts": None,
    }
    if whole:
        history = await entity_history(console.pool, internal_id, limit=_HISTORY)
        described["history"] = history.events
        kind = entity["resource_type"]
        described["accounts"] = await peer_accounts(
            await console.domains.list(), rows, await _endpoint(console, kind), kind
        )
    return described


async def identity(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    text = request.query.get("q", "")
    domains = [d.id for d in await console.domains.list()]
    lookup = parse_lookup(text, domains)
    found: list[dict[str, Any]] = []
    note = None
    if lookup is not None:
        ids, note = await _candidates(console, lookup)
        for internal_id in ids[:_LIMIT]:
            described = await _describe(console, internal_id, whole=len(ids) == 1)
            if described is not None:
                found.append(described)
    return render(
        request,
        "identity.html",
        page="identity",
        q=text,
        lookup=lookup,
        found=found,
        note=note,
        domains=domains,
    )
