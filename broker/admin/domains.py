"""The domain lifecycle in the admin API (admin scope), as ``broker domain`` does it:

- ``GET /admin/domains``, ``GET /admin/domains/{domain}``: settings, state and rows;
- ``PATCH /admin/domains/{domain}``: any setting of ``domain add`` (JSON; null takes a setting
  away); a push domain is tested after (the answer's ``test``: a failure is a warning);
- ``DELETE /admin/domains/{domain}[?keep_mappings=true][&force=true]``;
- ``POST /admin/domains/{domain}/disable|enable|test``.

Every change is audited (named query ``audit``) in the transaction that makes it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from broker.credentials import NOTHING_RESERVED, Reserved
from broker.domains import Domain, DomainStore
from broker.domainsettings import update_from_json
from broker.errors import InvalidValueError, NotFoundError
from broker.mapping.removal import remove_domain
from broker.probe import probe_domain

if TYPE_CHECKING:
    from broker.admin.api import Admin

__all__ = ["domain_json", "register", "update_from_json"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def domain_json(domain: Domain, footprint: Mapping[str, int] | None = None) -> dict[str, Any]:
    """A domain's settings and state (references to credentials, never a secret)."""
    document: dict[str, Any] = {
        "domain": domain.id,
        "kind": domain.kind,
        "status": domain.status,
        "scim_url": domain.scim_url,
        "credential": domain.credential_ref,
        "push": domain.push,
        "scope": domain.scope_filter,
        "read_attributes": domain.attribute_policy.get("read"),
        "write_attributes": domain.attribute_policy.get("write"),
        "deprovision": domain.deprovision,
        "suspend_for": str(domain.suspend_for),
        "on_conflict": domain.on_conflict.replace("_", "-"),
        "unlinkable": domain.unlinkable,
        "timestamp_precision": domain.timestamp_precision,
        "failing_since": domain.failing_since.isoformat() if domain.failing_since else None,
    }
    if footprint is not None:
        document["rows"] = dict(footprint)
    return document


class DomainHandlers:
    def __init__(self, admin: Admin, reserved: Reserved) -> None:
        self.admin = admin
        self.domains: DomainStore = admin.domains
        self.reserved = reserved

    async def list(self, request: web.Request) -> web.Response:
        await self.admin._admin(request)
        return web.json_response({"domains": [domain_json(d) for d in await self.domains.list()]})

    async def show(self, request: web.Request) -> web.Response:
        await self.admin._admin(request)
        domain = await self.domains.get(_name(request))
        return web.json_response(domain_json(domain, await self.domains.footprint(domain.id)))

    async def update(self, request: web.Request) -> web.Response:
        actor = await self.admin._admin(request)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise InvalidValueError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise InvalidValueError("the request body is a JSON object of settings")
        change = update_from_json(body)
        # The credential and the scope are checked by the store, as for `broker domain update`.
        domain = await self.domains.update(
            _name(request), change, actor=actor, reserved=self.reserved
        )
        document = domain_json(domain)
        if domain.push and domain.scim_url:
            document["test"] = (await probe_domain(domain)).json()
        return web.json_response(document)

    async def remove(self, request: web.Request) -> web.Response:
        actor = await self.admin._admin(request)
        removal = await remove_domain(
            self.admin.pool,
            _name(request),
            keep_mappings=_flag(request, "keep_mappings"),
            force=_flag(request, "force"),
            actor=actor,
        )
        self.domains.forget(removal.domain)
        return web.json_response(
            {"domain": removal.domain, "removed": True, "effects": list(removal.effects)}
        )

    async def act(self, request: web.Request) -> web.Response:
        actor = await self.admin._admin(request)
        name, action = _name(request), request.match_info["action"]
        if action == "test":
            report = await probe_domain(await self.domains.get(name))
            return web.json_response(report.json())  # "ok": false says it failed
        domain, changed = await self.domains.set_enabled(name, action == "enable", actor=actor)
        return web.json_response({**domain_json(domain), "changed": changed})


def _name(request: web.Request) -> str:
    """The domain the path names; a name no domain can have (a NUL, which PostgreSQL cannot
    even compare) is not found."""
    name = request.match_info["domain"]
    if "\x00" in name:
        raise NotFoundError(f"there is no domain {name!r}: `broker domain list` shows the domains")
    return name


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise InvalidValueError(f"{name} is true or false")
    return value in ("true", "1")


def register(app: web.Application, admin: Admin, reserved: Reserved = NOTHING_RESERVED) -> None:
    """The lifecycle routes, on the admin listener; ``reserved``: the broker's own secrets,
    which no domain's credential may name (a peer would be sent them as its token)."""
    handlers = DomainHandlers(admin, reserved)
    app.router.add_get("/admin/domains", handlers.list)
    app.router.add_get("/admin/domains/{domain}", handlers.show)
    app.router.add_patch("/admin/domains/{domain}", handlers.update)
    app.router.add_delete("/admin/domains/{domain}", handlers.remove)
    app.router.add_post(r"/admin/domains/{domain}/{action:disable|enable|test}", handlers.act)
