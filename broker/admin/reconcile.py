"""The admin API's reconciliation, for the console: start a run of a push peer (dry or not) and
read its report (docs/reconciliation.md).

- ``POST /admin/reconciliations`` with ``{"domain": "P1", "dryRun": true, "only": [...],
  "actions": {"unmatched": "deprovision"}, "confirmDeletions": 0}``: 202 Accepted, the run goes
  on in the background; its ``Location`` is the report.
- ``GET /admin/reconciliations/{id}?after=SEQ&count=N``: the run's phase, counts per situation,
  why it stopped if it did, and a page of its items.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import asyncpg
import orjson
from aiohttp import web

from broker.db import query
from broker.domains import Domain, DomainStore
from broker.errors import InvalidValueError, NotFoundError
from broker.reconcile.runner import Progress, Reconciler, Run, counts_of
from broker.reconcile.situations import ACTIONS, DEFAULT_ACTIONS, SITUATIONS, Options


class Admin(Protocol):
    """What the routes use of the admin listener: its database, domains, and authentication."""

    pool: asyncpg.Pool
    domains: DomainStore

    async def _admin(self, request: web.Request) -> str: ...


__all__ = ["ReconcilerFactory", "Reconciliations", "options_from", "register"]

log = logging.getLogger(__name__)

ReconcilerFactory = Callable[[Domain, Progress], Reconciler]
"""A reconciler of a push peer, with the serving broker's clients."""

_ITEMS_PAGE = 500


def options_from(body: Any) -> tuple[str, Options]:
    """The domain and the run's options from a request body; InvalidValueError naming the fix."""
    if not isinstance(body, dict) or not isinstance(body.get("domain"), str):
        raise InvalidValueError('the body is {"domain": "PEER", "dryRun": true|false, ...}')
    unknown = set(body) - {"domain", "dryRun", "only", "actions", "confirmDeletions"}
    if unknown:
        raise InvalidValueError(f"unknown members {sorted(unknown)}: see docs/reconciliation.md")
    dry_run = body.get("dryRun", False)
    only = body.get("only")
    actions = body.get("actions", {})
    confirm = body.get("confirmDeletions", 0)
    if not isinstance(dry_run, bool):
        raise InvalidValueError("dryRun is true or false")
    if only is not None and (
        not isinstance(only, list) or not only or any(s not in SITUATIONS for s in only)
    ):
        raise InvalidValueError(f"only lists situations among {', '.join(SITUATIONS)}")
    if not isinstance(actions, dict) or any(
        not isinstance(a, str) or a not in ACTIONS.get(s, ()) for s, a in actions.items()
    ):
        allowed = "; ".join(f"{s}: {'|'.join(a)}" for s, a in ACTIONS.items())
        raise InvalidValueError(f"actions maps a situation to an action it allows ({allowed})")
    if not isinstance(confirm, int) or isinstance(confirm, bool) or confirm < 0:
        raise InvalidValueError("confirmDeletions is the number of accounts, 0 or more")
    options = Options(
        actions={**DEFAULT_ACTIONS, **actions},
        only=frozenset(only) if only is not None else None,
        dry_run=dry_run,
        confirm_deletions=confirm,
    )
    return body["domain"], options


class Reconciliations:
    """Runs started from the admin API, each a background task of the admin listener."""

    def __init__(self, admin: Admin, make: ReconcilerFactory) -> None:
        self.admin = admin
        self.make = make
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self, request: web.Request) -> web.Response:
        actor = await self.admin._admin(request)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise InvalidValueError("the body is not JSON") from None
        domain_id, options = options_from(body)
        domain = await self.admin.domains.get(domain_id)
        reconciler = self.make(domain, lambda line: log.info("%s", line))
        run = await reconciler.start(options, actor=f"admin:{actor}")
        task = asyncio.create_task(self._run(reconciler, run), name=f"reconcile {domain.id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        location = str(request.url.with_path(f"/admin/reconciliations/{run.id}").with_query(None))
        return web.json_response(
            {"id": str(run.id), "domain": domain.id, "state": run.phase, "dryRun": run.dry_run},
            status=202,
            headers={"Location": location},
        )

    async def _run(self, reconciler: Reconciler, run: Run) -> None:
        try:
            await reconciler.run(run)
        except Exception:
            # The run stays unfinished: the next start for the domain resumes it.
            log.exception("reconciliation %s of %s stopped", run.id, run.domain_id)

    async def report(self, request: web.Request) -> web.Response:
        await self.admin._admin(request)
        try:
            run_id = uuid.UUID(request.match_info["run"])
            after = int(request.query.get("after", "0"))
            count = min(max(int(request.query.get("count", "100")), 1), _ITEMS_PAGE)
        except ValueError:
            raise NotFoundError(
                "a reconciliation is named by its UUID; after and count are whole numbers"
            ) from None
        pool = self.admin.pool
        record = await pool.fetchrow(query("reconciliation_by_id"), run_id)
        if record is None:
            raise NotFoundError(f"there is no reconciliation {run_id}: GET /admin/operations")
        items = await pool.fetch(query("report_items"), run_id, None, after, count)
        return web.json_response(
            {
                "id": str(run_id),
                "domain": record["domain_id"],
                "state": record["phase"],
                "dryRun": record["dry_run"],
                "initialSync": record["initial_sync"],
                "reason": record["reason"],
                "counts": await counts_of(pool, run_id),
                "items": [_item(i) for i in items],
                "next": items[-1]["seq"] if len(items) == count else None,
            }
        )

    async def close(self, _app: web.Application) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _item(record: Any) -> dict[str, Any]:
    return {
        "seq": record["seq"],
        "situation": record["situation"],
        "resourceType": record["resource_type"],
        "externalId": record["external_id"],
        "internalId": record["internal_id"],
        "action": record["action"],
        "done": record["done"],
        "detail": record["detail"],
    }


def register(app: web.Application, admin: Admin, make: ReconcilerFactory) -> None:
    """The reconciliation routes of the admin listener."""
    handlers = Reconciliations(admin, make)
    app.router.add_post("/admin/reconciliations", handlers.start)
    app.router.add_get("/admin/reconciliations/{run}", handlers.report)
    app.on_cleanup.append(handlers.close)
