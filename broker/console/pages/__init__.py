"""The console's pages, one module each, in the navigation's order. A page for a feature that
lands later (an entity's history, reconciliation, domain lifecycle, audit chain verification)
is a new module here and one ``Page`` in ``PAGES_NOW``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from broker.console.pages import auth, deliveries, domains, operations, reconcile
from broker.console.pages.audit import audit
from broker.console.pages.identity import identity
from broker.console.pages.overview import overview
from broker.console.shell import Page

__all__ = ["PAGES_NOW", "setup_auth"]


def _get(
    path: str, handler: Callable[[web.Request], Awaitable[web.Response]]
) -> Callable[[web.Application], None]:
    def setup(app: web.Application) -> None:
        app.router.add_get(path, handler)

    return setup


PAGES_NOW = (
    Page("overview", "Overview", "/", _get("/", overview), order=10),
    Page("identity", "Find", "/identity", _get("/identity", identity), order=20),
    Page("merge", "Merge and split", "/merge", operations.setup, order=30),
    Page("operations", "Operations", "/operations", lambda app: None, order=35),
    Page("deliveries", "Deliveries", "/deliveries", deliveries.setup, order=40),
    Page("reconcile", "Reconciliation", "/reconcile", reconcile.setup, order=45),
    Page("domains", "Domains", "/domains", domains.setup, order=50),
    Page("audit", "Audit", "/audit", _get("/audit", audit), order=60),
)
"""The pages on main today; operations' routes come with Merge and split."""

setup_auth = auth.setup
