"""Sign-in (a token exchanged for a session cookie) and sign-out."""

from __future__ import annotations

import secrets

from aiohttp import web

from broker.console.context import CONSOLE, session_of
from broker.console.core import COOKIE, cookie_options, csrf_ok
from broker.console.shell import PREFIX, message, render, safe_next
from broker.errors import BrokerError

__all__ = ["setup"]

PRE = "broker_console_pre"
"""Before sign-in there is no session: the sign-in form's CSRF token is a double-submit cookie."""


async def signin_form(request: web.Request) -> web.Response:
    pre = request.cookies.get(PRE) or secrets.token_urlsafe(24)
    response = render(
        request, "signin.html", csrf=pre, next=safe_next(request.query.get("next")), error=None
    )
    console = request.app[CONSOLE]
    response.set_cookie(
        PRE, pre, **cookie_options(secure=console.secure, max_age=console.session_ttl)
    )
    return response


async def signin(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    if not csrf_ok(request.cookies.get(PRE), form.get("csrf")):
        return message(request, 403, "the sign-in form expired: reload it and sign in again")
    token = form.get("token")
    target = safe_next(str(form.get("next") or ""))
    if not isinstance(token, str) or not token.strip():
        return render(
            request,
            "signin.html",
            status=400,
            csrf=request.cookies[PRE],
            next=target,
            error="paste a token with the admin or console:read scope",
        )
    try:
        session_id, _ = await console.sessions.start(token)
    except BrokerError as exc:  # never echo the token back
        return render(
            request,
            "signin.html",
            status=exc.status,
            csrf=request.cookies[PRE],
            next=target,
            error=exc.detail,
        )
    response = web.HTTPSeeOther(target)
    response.set_cookie(
        COOKIE, session_id, **cookie_options(secure=console.secure, max_age=console.session_ttl)
    )
    response.del_cookie(PRE, path=PREFIX)
    raise response


async def signout(request: web.Request) -> web.StreamResponse:
    session_of(request)  # admitted: a live session and its CSRF token
    await request.app[CONSOLE].sessions.end(request.cookies[COOKIE])
    response = web.HTTPSeeOther(f"{PREFIX}/signin")
    response.del_cookie(COOKIE, path=PREFIX)
    raise response


def setup(app: web.Application) -> None:
    app.router.add_get("/signin", signin_form)
    app.router.add_post("/signin", signin)
    app.router.add_post("/signout", signout)
