"""Overview: every domain with its kind, state, queue, dead letters, lag, leak-guard blocks and
SET backlog; the page refreshes its table by itself."""

from __future__ import annotations

from aiohttp import web

from broker.console.context import CONSOLE
from broker.console.shell import render
from broker.db import query

__all__ = ["overview"]


def _kind(record: dict[str, object]) -> str:
    if record["kind"] == "home":
        return "home"
    return "push" if record["push"] else "pull"


async def overview(request: web.Request) -> web.Response:
    pool = request.app[CONSOLE].pool
    records = [dict(r) for r in await pool.fetch(query("console_overview"))]
    blocks = {r["domain_id"]: r for r in await pool.fetch(query("console_leak_blocks"))}
    domains = []
    for record in records:
        block = blocks.get(record["id"])
        domains.append(
            {
                **record,
                "kind_label": _kind(record),
                "leak_blocks": block["blocks"] if block else 0,
                "leak_last_at": block["last_at"] if block else None,
            }
        )
    return render(request, "overview.html", page="overview", domains=domains)
