"""Deliveries: dead letters and pending deliveries per domain, with the reason and the peer's
answer; retry or discard one (through propagation's own ``settle_dead_letter``, audited)."""

from __future__ import annotations

from typing import Literal

from aiohttp import web

from broker.console.context import CONSOLE, session_of
from broker.console.core import delivery_reason
from broker.console.shell import PREFIX, render
from broker.db import query
from broker.errors import InvalidValueError, NotFoundError
from broker.propagation.outbox import settle_dead_letter

__all__ = ["setup"]

STATES = ("dead", "pending", "in_flight", "done", "cancelled")


async def deliveries(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    domain = request.query.get("domain") or None
    state = request.query.get("state") or None
    if state is not None and state not in STATES:
        raise InvalidValueError(f"state is one of {', '.join(STATES)}")
    records = await console.pool.fetch(query("console_deliveries"), domain, state, 200)
    rows = []
    for record in records:
        reason, answer = delivery_reason(record["last_error"])
        rows.append({**dict(record), "reason": reason, "answer": answer})
    return render(
        request,
        "deliveries.html",
        page="deliveries",
        rows=rows,
        domain=domain or "",
        state=state or "",
        states=STATES,
        domains=[d.id for d in await console.domains.list() if d.kind == "peer"],
        done=request.query.get("done"),
    )


async def act(request: web.Request) -> web.StreamResponse:
    session = session_of(request)
    session.require_admin()
    action: Literal["retry", "discard"] = (
        "retry" if request.match_info["action"] == "retry" else "discard"
    )
    try:
        delivery_id = int(request.match_info["id"])
    except ValueError:
        raise NotFoundError("a delivery ID is a number") from None
    record = await settle_dead_letter(request.app[CONSOLE].pool, delivery_id, action, session.actor)
    raise web.HTTPSeeOther(
        f"{PREFIX}/deliveries?domain={record['domain_id']}&done={action}-{delivery_id}"
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/deliveries", deliveries)
    app.router.add_post(r"/deliveries/{id}/{action:retry|discard}", act)
