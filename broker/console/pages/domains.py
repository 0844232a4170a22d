"""Domains: the list, their tokens; add a domain, change its settings, disable or enable it,
test the connection (the probe's report shown); issue a token (shown once, on the answer to the
form that made it, never again) and revoke one. Every change goes through ``DomainStore`` with
the admin API's own checks (``broker.domainsettings`` reads the form's settings; the store
parses the scope filter, refuses a broker secret as a peer's credential, and keeps the name
rule), audited with the console user's token name. A read-only session sees the pages, never the forms."""

from __future__ import annotations

from datetime import timedelta

from aiohttp import web

from broker.console.context import CONSOLE, session_of
from broker.console.forms import FIELDS, add_body, domain_form, update_body
from broker.console.shell import PREFIX, render
from broker.domains import Domain, check_domain_name
from broker.domainsettings import update_from_json
from broker.errors import InvalidValueError, NotFoundError
from broker.probe import ProbeReport, probe_domain
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
        blank={
            **dict.fromkeys(FIELDS, ""),
            "deprovision": "delete",
            "on_conflict": "dead-letter",
            "suspend_for": "30d",
        },
    )


async def _domain_page(
    request: web.Request,
    domain: Domain,
    *,
    report: ProbeReport | None = None,
    done: str | None = None,
    status: int = 200,
) -> web.Response:
    console = request.app[CONSOLE]
    return render(
        request,
        "domain.html",
        status=status,
        page="domains",
        domain=domain,
        form=domain_form(domain),
        footprint=await console.domains.footprint(domain.id),
        report=report,
        done=done or request.query.get("done"),
    )


async def domains(request: web.Request) -> web.Response:
    return await _page(request)


async def show(request: web.Request) -> web.Response:
    domain = await request.app[CONSOLE].domains.get(request.match_info["domain"])
    return await _domain_page(request, domain)


async def _tested(domain: Domain) -> ProbeReport | None:
    """A push domain's connection tested after a change, as ``domain add|update`` do."""
    return await probe_domain(domain) if domain.push and domain.scim_url else None


async def add(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    session.require_admin()
    form = await request.post()
    name = str(form.get("domain") or "").strip()
    check_domain_name(name)
    change = update_from_json(add_body({k: str(v) for k, v in form.items()}))
    domain = await console.domains.add(  # audited (domain_add) in the same transaction
        name,
        scim_url=change.scim_url,
        credential_ref=change.credential_ref,
        push=bool(change.push),
        scope_filter=change.scope_filter,
        read_attributes=change.read,
        write_attributes=change.write,
        deprovision=change.deprovision or "delete",
        suspend_for=change.suspend_for or timedelta(days=30),
        on_conflict=change.on_conflict or "dead_letter",
        unlinkable=bool(change.unlinkable),
        actor=session.actor,
        reserved=console.reserved,  # the store checks the credential and the scope
    )
    report = await _tested(domain)
    return await _domain_page(request, domain, report=report, done="added", status=201)


async def update(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    session.require_admin()
    form = await request.post()
    current = await console.domains.get(request.match_info["domain"])
    body = update_body({k: str(v) for k, v in form.items()}, domain_form(current))
    if not body:
        raise InvalidValueError("nothing changed: edit a setting, then save")
    domain = await console.domains.update(  # checked and audited by the store
        current.id, update_from_json(body), actor=session.actor, reserved=console.reserved
    )
    report = await _tested(domain)
    return await _domain_page(request, domain, report=report, done="saved")


async def act(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    session = session_of(request)
    session.require_admin()
    name, action = request.match_info["domain"], request.match_info["action"]
    domain = await console.domains.get(name)
    if action == "test":
        report = await probe_domain(domain)
        await console.audit(session, "domain_test", domain.id, {"ok": report.ok})
        return await _domain_page(request, domain, report=report)
    domain, changed = await console.domains.set_enabled(  # audited when it changed
        domain.id, action == "enable", actor=session.actor
    )
    outcome = f"{action}d" if changed else f"already-{domain.status}"
    raise web.HTTPSeeOther(f"{PREFIX}/domains/{domain.id}?done={outcome}")


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
    app.router.add_post("/domains", add)
    app.router.add_post("/domains/tokens", issue)
    app.router.add_post("/domains/tokens/{id}/revoke", revoke)
    one = r"/domains/{domain:(?!tokens$)[^/]+}"  # /domains/tokens is the tokens' form
    app.router.add_get(one, show)
    app.router.add_post(one, update)
    app.router.add_post(one + r"/{action:disable|enable|test}", act)
