"""Merge and split: pick the entities, see the dry run (the table before and after, each peer's
task: the mapping store's own dry run, the planning code the operation runs, in a transaction
rolled back, so the page shows exactly what ``broker merge|split --dry-run`` prints), confirm, then watch each peer's progress
until the operation is done. The confirmation carries the idempotency key made for the dry run,
so a form sent twice makes one operation."""

from __future__ import annotations

import re
import uuid
from typing import Any, Literal

from aiohttp import web

from broker.console.context import CONSOLE, Console, session_of
from broker.console.core import seed_table, split_moves_from_form
from broker.console.shell import PREFIX, render
from broker.db import query
from broker.errors import InvalidValueError, NotFoundError
from broker.mapping.render import TASK_HEADER, peer_tasks
from broker.mapping.store import Operation, Preview, merge_planner, split_planner

__all__ = ["setup"]

_IDS = re.compile(r"[\s,]+")


def _ids(text: object) -> list[str]:
    return [part for part in _IDS.split(str(text or "").strip()) if part]


def _one(form: Any, name: str, label: str) -> str:
    value = str(form.get(name) or "").strip()
    if not value:
        raise InvalidValueError(f"{label} is required: an internal ID (find it under Find)")
    return value


async def _check_entities(console: Console, ids: list[str]) -> None:
    """NotFoundError naming an unknown entity; InvalidValueError for a merged or deleted one
    (the store refuses them too; the dry run says so first)."""
    records = {
        r["internal_id"]: r for r in await console.pool.fetch(query("console_entities"), ids)
    }
    for internal_id in ids:
        record = records.get(internal_id)
        if record is None:
            raise NotFoundError(f"the broker knows no entity {internal_id}: find it under Find")
        if record["state"] != "active":
            raise InvalidValueError(
                f"{internal_id} is {record['state']}"
                + (f" into {record['merged_into']}" if record["merged_into"] else "")
                + ": only active entities can be merged or split"
            )


async def merge_form(request: web.Request) -> web.Response:
    return render(
        request,
        "merge.html",
        page="merge",
        survivor=request.query.get("survivor", ""),
        losers=request.query.get("losers", ""),
        preview=None,
    )


async def merge_preview(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    form = await request.post()
    survivor = _one(form, "survivor", "the survivor")
    losers = _ids(form.get("losers"))
    if not losers:
        raise InvalidValueError("name at least one entity to merge into the survivor")
    await _check_entities(console, [survivor, *losers])
    preview = await console.store.preview([survivor, *losers], merge_planner(survivor, losers))
    return render(
        request,
        "merge.html",
        page="merge",
        survivor=survivor,
        losers=" ".join(losers),
        preview=_preview(preview),
        key=f"console-{uuid.uuid4()}",
    )


def _preview(preview: Preview) -> dict[str, Any]:
    """The store's dry run drawn as the CLI draws it: both tables, then each peer's tasks."""
    return {
        "before": seed_table(preview.before),
        "after": seed_table(preview.after, preview.before),
        "header": TASK_HEADER,
        "tasks": peer_tasks(preview.plan),
    }


async def merge(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    session = session_of(request)
    session.require_admin()
    form = await request.post()
    survivor = _one(form, "survivor", "the survivor")
    losers = _ids(form.get("losers"))
    operation = await console.store.merge(
        survivor, losers, idempotency_key=_one(form, "key", "the key"), actor=session.actor
    )
    raise web.HTTPSeeOther(f"{PREFIX}/operations/{operation.id}")


async def split_form(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    source = request.query.get("source", "").strip()
    rows = await console.store.rows_of([source]) if source else []
    return render(
        request,
        "split.html",
        page="merge",
        source=source,
        rows=seed_table(rows),
        new="",
        picked=[],
        provision="eager",
        preview=None,
    )


def _provision(form: Any) -> Literal["eager", "on_demand"]:
    value = form.get("provision", "eager")
    if value == "eager":
        return "eager"
    if value == "on_demand":
        return "on_demand"
    raise InvalidValueError('provisioning is "eager" or "on_demand"')


async def _check_in_home(console: Console, source: str, new: str) -> None:
    """InvalidValueError unless home holds the new entity (a split's new entity is created in
    home first), when the broker has a home to ask."""
    if console.home is None:
        return
    record = await console.pool.fetchrow(query("console_entity"), source)
    endpoints = (await console.home.schema()).endpoints
    endpoint = endpoints.by_type.get(record["resource_type"]) if record else None
    if endpoint is None:
        return
    answer = await console.home.request("GET", f"{endpoint}/{new}")
    if answer.status != 200:
        raise InvalidValueError(
            f"home holds no {record['resource_type'] if record else 'resource'} {new}: create "
            "the new entity in home first, then split"
        )


async def split_preview(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    form = await request.post()
    source = _one(form, "source", "the source")
    new = _one(form, "new", "the new entity")
    picked = [str(v) for v in form.getall("move", [])]
    provision = _provision(form)
    await _check_entities(console, [source])
    await _check_in_home(console, source, new)
    moves = split_moves_from_form(new, picked)
    preview = await console.store.preview([source, new], split_planner(source, moves, provision))
    return render(
        request,
        "split.html",
        page="merge",
        source=source,
        rows=seed_table(await console.store.rows_of([source])),
        new=new,
        picked=picked,
        provision=provision,
        preview=_preview(preview),
        key=f"console-{uuid.uuid4()}",
    )


async def split(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    session = session_of(request)
    session.require_admin()
    form = await request.post()
    source = _one(form, "source", "the source")
    new = _one(form, "new", "the new entity")
    moves = split_moves_from_form(new, [str(v) for v in form.getall("move", [])])
    operation = await console.store.split(
        source,
        moves,
        idempotency_key=_one(form, "key", "the key"),
        actor=session.actor,
        provision=_provision(form),
    )
    raise web.HTTPSeeOther(f"{PREFIX}/operations/{operation.id}")


async def operations(request: web.Request) -> web.Response:
    records = await request.app[CONSOLE].pool.fetch(query("recent_operations"), 50)
    return render(
        request,
        "operations.html",
        page="operations",
        operations=[Operation.from_record(r) for r in records],
    )


async def operation(request: web.Request) -> web.Response:
    try:
        op_id = uuid.UUID(request.match_info["op"])
    except ValueError:
        raise NotFoundError(
            "an operation ID is a UUID, as the operations page lists them"
        ) from None
    found = await request.app[CONSOLE].store.operation(op_id)
    return render(request, "operation.html", page="operations", op=found)


def setup(app: web.Application) -> None:
    app.router.add_get("/merge", merge_form)
    app.router.add_post("/merge/preview", merge_preview)
    app.router.add_post("/merge", merge)
    app.router.add_get("/split", split_form)
    app.router.add_post("/split/preview", split_preview)
    app.router.add_post("/split", split)
    app.router.add_get("/operations", operations)
    app.router.add_get("/operations/{op}", operation)
