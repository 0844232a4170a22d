"""Domains: the list, their tokens; issue a token (shown once, on the answer to the form that
made it, never again) and revoke one. Both audited with the console user's token name."""

from __future__ import annotations

from aiohttp import web

from broker.console.context import CONSOLE, session_of
from broker.console.shell import PREFIX, render
from broker.errors import InvalidValueError, NotFoundError
from broker.tokens import SCOPES, parse_duration

__all__ = ["setup"]


async def _page(
    request: web.Request, *, issued: str | None = None, status: int = 200
) -> web.Response:
    console = request.app[CONSOLE]
    return render(
        request,
        "domains.html",
        status=status,
        page="domains",
        domains=await console.domains.list(),
        tokens=await console.tokens.list(),
        scopes=SCOPES,
        issued=issued,
        done=request.query.get("done"),
    )


async def domains(request: web.Request) -> web.Response:
    return await _page(request)


async def issue(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    session.require_admin()
    form = await request.post()
    domain = str(form.get("domain") or "").strip()
    if not domain:
        raise InvalidValueError("pick the domain the token is for")
    scopes = [str(s) for s in form.getall("scopes", [])] or None
    expires = str(form.get("expires") or "").strip()
    token, _ = await console.tokens.issue(  # audited (token_issue) in the same transaction
        domain,
        scopes=scopes,
        expires_in=parse_duration(expires) if expires else None,
        actor=session.actor,
    )
    return await _page(request, issued=token, status=201)


async def revoke(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    session = session_of(request)
    session.require_admin()
    try:
        token_id = int(request.match_info["id"])
    except ValueError:
        raise NotFoundError("a token ID is a number") from None
    await console.tokens.revoke(token_id, actor=session.actor)  # audited (token_revoke)
    raise web.HTTPSeeOther(f"{PREFIX}/domains?done=revoked-{token_id}")


def setup(app: web.Application) -> None:
    app.router.add_get("/domains", domains)
    app.router.add_post("/domains/tokens", issue)
    app.router.add_post("/domains/tokens/{id}/revoke", revoke)
