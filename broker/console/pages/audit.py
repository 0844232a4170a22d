"""Audit: the log, newest first, filtered by actor, action, subject and time; and on request
(``?verify=1``) the hash chain verified from its first row to its head, as
``broker audit verify`` does it (``broker.auditlog.verify_database``)."""

from __future__ import annotations

from datetime import datetime

from aiohttp import web

from broker.auditlog import verify_database
from broker.console.context import CONSOLE
from broker.console.shell import render
from broker.db import query
from broker.errors import InvalidValueError

__all__ = ["audit"]


def _since(text: str) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidValueError(
            f"since {text!r} is not a date and time: write it as 2026-12-05T09:30"
        ) from None
    return moment if moment.tzinfo else moment.astimezone()


async def audit(request: web.Request) -> web.Response:
    pool = request.app[CONSOLE].pool
    filters = {k: request.query.get(k, "").strip() for k in ("actor", "action", "subject", "since")}
    records = await pool.fetch(
        query("console_audit"),
        filters["actor"] or None,
        filters["action"] or None,
        filters["subject"] or None,
        _since(filters["since"]),
        200,
    )
    actions = [r["action"] for r in await pool.fetch(query("console_audit_actions"))]
    verified = None
    if request.query.get("verify"):
        held, broken = await verify_database(pool)
        verified = {"rows": held, "broken": broken}
    return render(
        request,
        "audit.html",
        page="audit",
        rows=records,
        filters=filters,
        actions=actions,
        verified=verified,
    )
