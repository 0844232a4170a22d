"""The console's web plumbing: the page registry, rendering, and the middleware that admits a
request (a live session; on every POST the session's CSRF token) and turns every failure into a
SCIM-style message page (RFC 7644 section 3.12's status, scimType and detail), never a trace."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from aiohttp import web

from broker.console.context import CONSOLE, SESSION_KEY
from broker.console.core import COOKIE, age, csrf_ok
from broker.errors import BrokerError
from broker.responses import DATABASE_DOWN, ERROR_SCHEMA

__all__ = [
    "PAGES",
    "PUBLIC_PATHS",
    "Page",
    "console_middleware",
    "message",
    "render",
    "safe_next",
]

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
PREFIX = "/console"


@dataclass(frozen=True)
class Page:
    """A page of the console: its place in the navigation and the routes it adds. A feature
    that lands later (history, reconciliation, domain lifecycle) adds a Page here, in
    ``broker/console/pages/`` beside the others."""

    name: str
    title: str
    path: str
    """Below ``/console``: ``/`` or ``/identity``."""
    setup: Callable[[web.Application], None]
    order: int = 100


PAGES: list[Page] = []
"""The registry, filled by ``broker.console.pages`` and read by the navigation."""

PUBLIC_PATHS = frozenset({"/console/signin"})
"""Paths that answer without a session (the static files too)."""

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(
    request: web.Request,
    template: str,
    *,
    status: int = 200,
    page: str = "",
    **context: Any,
) -> web.Response:
    """``template`` rendered with the navigation, the session (its CSRF token for forms) and
    ``context``."""
    now = datetime.now(UTC)
    body = _ENV.get_template(template).render(
        pages=sorted(PAGES, key=lambda p: p.order),
        current=page,
        session=request.get(SESSION_KEY),
        now=now,
        age=lambda moment: age(moment, now),
        prefix=PREFIX,
        **context,
    )
    return web.Response(status=status, text=body, content_type="text/html", charset="utf-8")


def message(
    request: web.Request, status: int, detail: str, scim_type: str | None = None
) -> web.Response:
    """A SCIM-style message page: the error's status, scimType and detail, and where to go."""
    return render(
        request,
        "message.html",
        status=status,
        error={"schemas": [ERROR_SCHEMA], "status": str(status), "scimType": scim_type},
        detail=detail,
    )


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a console path only (never another site), with no control
    character (a newline would make the redirect's header fail; browsers drop tabs)."""
    if (
        value
        and value.startswith(PREFIX + "/")
        and not value.startswith("//")
        and "\\" not in value
        and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    ):
        return value
    return PREFIX + "/"


_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


@web.middleware
async def console_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await _admitted(request, handler)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = {404: "there is no such page in the console", 405: "not allowed here"}
        response = message(request, exc.status, detail.get(exc.status, exc.reason))
    except BrokerError as exc:
        response = message(request, exc.status, exc.detail, exc.scim_type)
    except DATABASE_DOWN as exc:
        log.warning("console: database unavailable: %r", exc)
        response = message(request, 503, "the broker's database is unavailable; reload soon")
    except Exception:
        correlation = uuid.uuid4().hex[:12]
        log.exception("console: internal error, correlation ID %s", correlation)
        response = message(
            request,
            500,
            f"something failed inside the broker (correlation ID {correlation}); the log "
            "has the details under that ID",
        )
    for name, value in _HEADERS.items():
        response.headers.setdefault(name, value)
    return response


async def _admitted(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The handler's answer for a request with a live session, and on POST the right CSRF
    token; otherwise a refusal (a GET is sent to sign in)."""
    if request.path in PUBLIC_PATHS or request.path.startswith(PREFIX + "/static/"):
        return await handler(request)
    console = request.app[CONSOLE]
    session = await console.sessions.find(request.cookies.get(COOKIE))
    if session is None:
        if request.method in ("GET", "HEAD"):
            raise web.HTTPSeeOther(f"{PREFIX}/signin?next={quote(request.path_qs, safe='')}")
        return message(request, 401, "sign in first: this needs a console session")
    request[SESSION_KEY] = session
    if request.method not in ("GET", "HEAD"):
        form = await request.post()
        if not csrf_ok(session.csrf, form.get("csrf")):
            return message(
                request,
                403,
                "the form's CSRF token is not this session's: reload the page and submit again",
            )
    return await handler(request)
