"""The operator console: server-rendered pages on the admin listener at ``{admin}/console/``
(docs/console.md). A feature package beside ``broker/admin/``: it uses the base floor, the
mapping store and propagation's dead-letter settlement, and sends nothing to any domain."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
from aiohttp import web

from broker.console.context import CONSOLE, Console, ReconcilerFactory
from broker.console.shell import HERE, PAGES, PREFIX, console_middleware
from broker.credentials import NOTHING_RESERVED, Reserved
from broker.home import HomeClient
from broker.mapping.store import MappingStore

__all__ = ["register_console"]


def register_console(
    admin_app: web.Application,
    pool: asyncpg.Pool,
    store: MappingStore,
    home: HomeClient | None,
    *,
    secure: bool,
    session_ttl: timedelta = timedelta(hours=8),
    reserved: Reserved = NOTHING_RESERVED,
    reconcilers: ReconcilerFactory | None = None,
) -> None:
    """Mount the console on the admin listener's application at ``/console/``; ``secure``:
    the session cookie is sent over TLS only (the broker's public URL is https); ``reserved``:
    the broker's own secrets, which no domain's credential may name; ``reconcilers``: makes a
    reconciler of a push peer (None: no home, no reconciliation)."""
    from broker.console.pages import PAGES_NOW, setup_auth

    app = web.Application(middlewares=[console_middleware])
    console = Console(pool, store, home, secure, session_ttl, reserved, reconcilers)
    app[CONSOLE] = console

    async def close(_app: web.Application) -> None:
        await console.close()

    app.on_cleanup.append(close)
    if not PAGES:
        PAGES.extend(PAGES_NOW)
    for page in PAGES:
        page.setup(app)
    setup_auth(app)
    app.router.add_static("/static/", HERE / "static", append_version=True)
    admin_app.add_subapp(PREFIX, app)
