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

import aiohttp
import orjson
from aiohttp import web

from broker.credentials import NOTHING_RESERVED, Reserved, credential_ref
from broker.domains import Domain, DomainStore, DomainUpdate
from broker.errors import InvalidValueError, NotFoundError
from broker.mapping.removal import remove_domain
from broker.probe import ProbeReport, probe
from broker.tokens import parse_duration

if TYPE_CHECKING:
    from broker.admin.api import Admin

__all__ = ["domain_json", "register", "update_from_json"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_FLAGS = ("push", "unlinkable")
_TEXTS = {"scim_url": "scim_url", "scope": "scope_filter"}
_LISTS = {"read_attributes": "read", "write_attributes": "write"}
_KNOWN = {
    *_FLAGS,
    *_TEXTS,
    *_LISTS,
    "token_env",
    "token_file",
    "deprovision",
    "suspend_for",
    "on_conflict",
    "timestamp_precision",
}


def update_from_json(body: Mapping[str, Any]) -> DomainUpdate:
    """A PATCH body as the update it asks for (pure); InvalidValueError naming the member."""
    unknown = set(body) - _KNOWN
    if unknown:
        raise InvalidValueError(
            f"unknown members {', '.join(sorted(unknown))}: a PATCH takes {', '.join(sorted(_KNOWN))}"
        )
    fields: dict[str, Any] = {}
    clear: set[str] = set()
    for key in _FLAGS:
        if key in body:
            if not isinstance(body[key], bool):
                raise InvalidValueError(f'"{key}" is true or false')
            fields[key] = body[key]
    for key, name in {**_TEXTS, **_LISTS}.items():
        if key not in body:
            continue
        value = body[key]
        if value is None:
            clear.add(name)
        elif _well_typed(key, value):
            fields[name] = value
        else:
            kind = "a list of attribute names" if key in _LISTS else "a non-empty string"
            raise InvalidValueError(f'"{key}" is {kind}, or null to take it away')
    if "token_env" in body or "token_file" in body:
        env, file = body.get("token_env"), body.get("token_file")
        if not all(v is None or (isinstance(v, str) and v) for v in (env, file)) or (env and file):
            raise InvalidValueError('give "token_env" or "token_file" (a string), or null for none')
        if any(
            isinstance(v, str) and any(ord(c) < 0x20 or c == "\x7f" for c in v) for v in (env, file)
        ):
            raise InvalidValueError(
                '"token_env" and "token_file" hold no control character (a NUL, a newline): '
                "name the variable or the file as it is"
            )
        ref = credential_ref(env, file)
        if ref is None:
            clear.add("credential_ref")
        else:
            fields["credential_ref"] = ref
    fields.update(_choices(body))
    return DomainUpdate(**fields, clear=frozenset(clear))


def _well_typed(key: str, value: Any) -> bool:
    if key in _LISTS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, str) and bool(value)


def _choices(body: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "deprovision" in body:
        if body["deprovision"] not in ("delete", "suspend"):
            raise InvalidValueError('"deprovision" is "delete" or "suspend"')
        out["deprovision"] = body["deprovision"]
    if "on_conflict" in body:
        value = str(body["on_conflict"]).replace("-", "_")
        if value not in ("link", "dead_letter"):
            raise InvalidValueError('"on_conflict" is "link" or "dead-letter"')
        out["on_conflict"] = value
    if "suspend_for" in body:
        if not isinstance(body["suspend_for"], str):
            raise InvalidValueError('"suspend_for" is a duration such as "30d"')
        out["suspend_for"] = parse_duration(body["suspend_for"])
    if "timestamp_precision" in body:
        value = body["timestamp_precision"]
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidValueError('"timestamp_precision" is a whole number of seconds')
        out["timestamp_precision"] = value
    return out


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
            document["test"] = (await _probe(domain)).json()
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
            domain = await self.domains.get(name)
            if not domain.scim_url:
                raise InvalidValueError(
                    f"domain {name} has no SCIM URL: nothing to test (it calls the broker; "
                    "the broker does not call it)"
                )
            report = await _probe(domain)
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


async def _probe(domain: Domain) -> ProbeReport:
    assert domain.scim_url is not None
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return await probe(session, domain.id, domain.scim_url, domain.credential_ref)


def register(app: web.Application, admin: Admin, reserved: Reserved = NOTHING_RESERVED) -> None:
    """The lifecycle routes, on the admin listener; ``reserved``: the broker's own secrets,
    which no domain's credential may name (a peer would be sent them as its token)."""
    handlers = DomainHandlers(admin, reserved)
    app.router.add_get("/admin/domains", handlers.list)
    app.router.add_get("/admin/domains/{domain}", handlers.show)
    app.router.add_patch("/admin/domains/{domain}", handlers.update)
    app.router.add_delete("/admin/domains/{domain}", handlers.remove)
    app.router.add_post(r"/admin/domains/{domain}/{action:disable|enable|test}", handlers.act)
