"""Reconciliation: start a run of a push peer (a dry run by default), see its counts per
situation with the accounts behind each, then apply it: a real run with the dry run's options.
Runs go through ``broker.reconcile`` (the reconciler the admin API and ``broker reconcile``
use), in the background of the admin listener; the run's page follows it until it ends. The
start is audited by the reconciler (``reconcile.start``) with the session's token."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from aiohttp import web

from broker.console.context import CONSOLE, Console, session_of
from broker.console.shell import PREFIX, render
from broker.db import query
from broker.errors import InvalidValueError, NotFoundError
from broker.reconcile.runner import Reconciler, Run, counts_of
from broker.reconcile.situations import ACTIONS, DEFAULT_ACTIONS, SITUATIONS, Options

__all__ = ["setup"]

log = logging.getLogger(__name__)

ITEMS = 50
"""The accounts shown under each situation."""

RUNNING = ("index", "peer", "home", "actions")


async def runs(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    latest = await console.pool.fetch(query("latest_reconciliations"), False)
    return render(
        request,
        "reconcile.html",
        page="reconcile",
        peers=[d.id for d in await console.domains.list() if d.push and d.kind == "peer"],
        latest=[dict(r) for r in latest],
        actions=ACTIONS,
        defaults=DEFAULT_ACTIONS,
        available=console.reconcilers is not None,
    )


def _options(form: Any, *, dry_run: bool) -> Options:
    """The run's options from the form: an action per situation (the defaults when not
    given), each one the situation allows."""
    actions = dict(DEFAULT_ACTIONS)
    for situation, allowed in ACTIONS.items():
        chosen = form.get(f"on_{situation}")
        if chosen is None:
            continue
        if chosen not in allowed:
            raise InvalidValueError(f"{situation}: the action is one of {', '.join(allowed)}")
        actions[situation] = str(chosen)
    confirm = str(form.get("confirm_deletions") or "0")
    if not confirm.isdigit():
        raise InvalidValueError("confirm deletions: the number of accounts, 0 or more")
    return Options(actions=actions, dry_run=dry_run, confirm_deletions=int(confirm))


def _reconciler(console: Console, domain: Any) -> Reconciler:
    if console.reconcilers is None:
        raise InvalidValueError(
            "reconciliation needs home: set [home] scim_url, then run `broker serve` again"
        )
    return console.reconcilers(domain, lambda line: log.info("%s", line))


async def _background(console: Console, reconciler: Reconciler, run: Run) -> None:
    try:
        await reconciler.run(run)
    except Exception:
        # The run stays unfinished: the next start for the domain resumes it.
        log.exception("reconciliation %s of %s stopped", run.id, run.domain_id)


async def start(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    session = session_of(request)
    session.require_admin()
    form = await request.post()
    domain = await console.domains.get(str(form.get("domain") or ""))
    mode = form.get("mode", "dry")
    if mode not in ("dry", "apply"):
        raise InvalidValueError('the mode is "dry" (a dry run) or "apply"')
    options = _options(form, dry_run=mode == "dry")
    reconciler = _reconciler(console, domain)
    run = await reconciler.start(options, actor=session.actor)  # audited: reconcile.start
    task = asyncio.create_task(
        _background(console, reconciler, run), name=f"console reconcile {domain.id}"
    )
    console.tasks.add(task)
    task.add_done_callback(console.tasks.discard)
    raise web.HTTPSeeOther(f"{PREFIX}/reconcile/{run.id}")


async def report(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    try:
        run_id = uuid.UUID(request.match_info["run"])
    except ValueError:
        raise NotFoundError(
            "a reconciliation is named by its UUID, as the page lists them"
        ) from None
    record = await console.pool.fetchrow(query("reconciliation_by_id"), run_id)
    if record is None:
        raise NotFoundError(f"there is no reconciliation {run_id}: see Reconciliation")
    counts = await counts_of(console.pool, run_id)
    items = {
        situation: [
            dict(i)
            for i in await console.pool.fetch(query("report_items"), run_id, [situation], 0, ITEMS)
        ]
        for situation in SITUATIONS
        if counts["situations"].get(situation)
    }
    options = Options.from_json(record["options"])
    return render(
        request,
        "reconcile_run.html",
        page="reconcile",
        run=dict(record),
        running=record["phase"] in RUNNING,
        counts=counts,
        items=items,
        options=options,
        limit=ITEMS,
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/reconcile", runs)
    app.router.add_post("/reconcile", start)
    app.router.add_get("/reconcile/{run}", report)
