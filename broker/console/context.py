"""What every console page works with, declared once as typed application state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
from aiohttp import web

from broker.console.sessions import Session, SessionStore
from broker.credentials import NOTHING_RESERVED, Reserved
from broker.db import query
from broker.domains import Domain, DomainStore
from broker.home import HomeClient
from broker.mapping.store import MappingStore
from broker.reconcile.runner import Progress, Reconciler
from broker.tokens import TokenStore

__all__ = ["CONSOLE", "SESSION_KEY", "Console", "ReconcilerFactory", "session_of"]

ReconcilerFactory = Callable[[Domain, Progress], Reconciler]
"""A reconciler of a push peer with the serving broker's clients (the wiring makes it)."""


@dataclass
class Console:
    """The console's resources: the database, the mapping store (merge, split, rows), the
    client toward home (userName and email searches), and the session settings."""

    pool: asyncpg.Pool
    store: MappingStore
    home: HomeClient | None
    secure: bool
    """Whether the cookie is ``Secure`` (the broker's public URL is https)."""
    session_ttl: timedelta = timedelta(hours=8)
    reserved: Reserved = NOTHING_RESERVED
    """The broker's own secrets, which no domain's credential may name."""
    reconcilers: ReconcilerFactory | None = None
    """None when the broker has no home to reconcile against."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    """Reconciliations started from the console, running in the background."""
    tokens: TokenStore = field(init=False)
    domains: DomainStore = field(init=False)
    sessions: SessionStore = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = TokenStore(self.pool, cache_seconds=0)
        self.domains = DomainStore(self.pool)
        self.sessions = SessionStore(self.pool, self.tokens, self.session_ttl)

    async def close(self) -> None:
        """Stop the background runs (a run left unfinished resumes at its next start)."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def audit(
        self, session: Session, action: str, subject: str | None, details: dict[str, Any]
    ) -> None:
        """One audit row, named by the token the session was opened with."""
        await self.pool.execute(query("audit"), session.actor, action, subject, details)


CONSOLE = web.AppKey("console", Console)

SESSION_KEY = web.RequestKey("console_session", Session)


def session_of(request: web.Request) -> Session:
    """The request's session (the middleware admitted only requests that have one)."""
    return request[SESSION_KEY]
