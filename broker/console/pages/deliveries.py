"""Deliveries: dead letters and pending deliveries per domain, with the reason and the peer's
answer; retry or discard one (through propagation's own ``settle_dead_letter``, audited), or all
of a domain's: counted, confirmed on a page that names the count, then settled only while the
count is still the one confirmed (the admin API's ``expected`` guard), audited batch by batch."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web

from broker.console.context import CONSOLE, session_of
from broker.console.core import delivery_reason
from broker.console.shell import PREFIX, render
from broker.db import query
from broker.errors import InvalidValueError, NotFoundError
from broker.propagation.outbox import (
    check_expected,
    count_dead_letters,
    dead_letter_window,
    settle_dead_letter,
    settle_dead_letters,
)

__all__ = ["setup"]

STATES = ("dead", "pending", "in_flight", "done", "cancelled")


async def deliveries(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    domain = request.query.get("domain") or None
    state = request.query.get("state") or None
    if state is not None and state not in STATES:
        raise InvalidValueError(f"state is one of {', '.join(STATES)}")
    records = await console.pool.fetch(query("console_deliveries"), domain, state, 200)
    dead = await _count(request, domain) if domain else None
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
        dead=dead,
    )


async def _count(request: web.Request, domain: str) -> int:
    window = dead_letter_window(everything=True, since=None, now=datetime.now(UTC))
    return (await count_dead_letters(request.app[CONSOLE].pool, domain, window)).count


def _action(text: Any) -> Literal["retry", "discard"]:
    if text == "retry":
        return "retry"
    if text == "discard":
        return "discard"
    raise InvalidValueError('the action is "retry" or "discard"')


async def confirm_all(request: web.Request) -> web.Response:
    """The confirmation step: how many dead letters of the domain the action would settle."""
    session_of(request).require_admin()
    domain = request.query.get("domain", "")
    action = _action(request.query.get("action"))
    return render(
        request,
        "deliveries_all.html",
        page="deliveries",
        domain=domain,
        action=action,
        count=await _count(request, domain),
    )


async def act_all(request: web.Request) -> web.StreamResponse:
    session = session_of(request)
    session.require_admin()
    form = await request.post()
    domain, action = str(form.get("domain") or ""), _action(form.get("action"))
    expected = str(form.get("expected") or "")
    if not expected.isdigit():
        raise InvalidValueError("confirm the count first: the confirmation page names it")
    pool = request.app[CONSOLE].pool
    window = dead_letter_window(everything=True, since=None, now=datetime.now(UTC))
    letters = await count_dead_letters(pool, domain, window)
    check_expected(letters, int(expected), "go back to Deliveries, count them again")
    settled = await settle_dead_letters(pool, letters, action, session.actor)  # audited
    raise web.HTTPSeeOther(f"{PREFIX}/deliveries?domain={domain}&done={action}-all-{settled.count}")


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
    app.router.add_get("/deliveries/all", confirm_all)
    app.router.add_post("/deliveries/all", act_all)
    app.router.add_post(r"/deliveries/{id}/{action:retry|discard}", act)
