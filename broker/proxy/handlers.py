"""The domain-facing SCIM endpoint (RFC 7644) at ``{public_url}/scim/v2``: a thin aiohttp adapter.

Every request takes the same path (DESIGN section 8), and nothing skips a step:

1. **route** from an allow-list (:func:`route_guard`: no encoded ``/``, ``?``, ``#``, no ``..``);
2. **canonical request** (``broker.scim.canonical``): the body parsed once, every attribute name
   resolved to one spelling;
3. **policy decision** (``broker.scim.policy``, pure): scope, read list, write list, references;
4. **translation** inbound, the call to home, translation outbound;
5. **leak guard** on every byte of every answer, errors included (:meth:`Proxy._respond`).

The decisions are pure functions in ``broker.scim``; this module reads the request, asks the
store and home, and writes the response. Bulk lives in ``broker.proxy.bulk``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web

from broker.domains import Domain, DomainStore
from broker.errors import BrokerError, ForbiddenError, InvalidValueError, NotFoundError
from broker.events.sets import service_provider_config_events
from broker.home import SEARCH_SCHEMA, HomeClient, HomeRefused, HomeResponse, HomeSchema
from broker.http import SCIM_JSON
from broker.mapping.guard import LeakGuard
from broker.mapping.store import MappingStore
from broker.responses import (
    SCIM_PREFIX,
    UnsupportedMediaType,
    error_document,
    error_response,
)
from broker.scim.attributes import AttrRef, ResourceSchema
from broker.scim.canonical import (
    CanonicalResource,
    canonical_patch,
    canonical_resource,
    check_text,
    parse_body,
    path_segments,
)
from broker.scim.filters import FilterError, FilterIds, filter_ids, parse_filter, rewrite_filter
from broker.scim.guard import IdShape, scrub
from broker.scim.outbound import DomainView, ids_in_resources, resources_for_domain
from broker.scim.patch import PatchRequest, parse_patch
from broker.scim.policy import (
    DomainPolicy,
    check_create_scope,
    check_filter,
    check_sort,
    check_write,
    keep_hidden_in_document,
    keep_hidden_members,
    members_by_value,
    put_as_patch,
)
from broker.scim.rewrite import IdVisitor, Translation, collect_ids, rewrite_document
from broker.scim.versions import (
    PreconditionFailedError,
    VersionSealer,
    home_condition,
    present_etag,
    present_meta,
)
from broker.scim.writeonly import write_only_values
from broker.tokens import TokenStore

__all__ = ["Proxy", "route_guard"]

log = logging.getLogger(__name__)

LIST_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
LIST_PARAMS = (
    "filter",
    "sortBy",
    "sortOrder",
    "startIndex",
    "count",
    "attributes",
    "excludedAttributes",
)
GET_PARAMS = ("attributes", "excludedAttributes")
NOT_FOUND = "resource not found"
_DISCOVERY = {"serviceproviderconfig", "schemas", "resourcetypes", "bulk"}
_ACCEPTED_TYPES = {"application/scim+json", "application/json"}


@web.middleware
async def route_guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Step 1: a path under /scim/v2 that smuggles a path or a query never reaches a handler."""
    if request.path.startswith(SCIM_PREFIX) or request.raw_path.startswith(SCIM_PREFIX):
        try:
            path_segments(request.raw_path)
        except BrokerError as exc:
            return error_response(exc.status, exc.detail, exc.scim_type)
    return await handler(request)


@dataclass(frozen=True)
class _Target:
    """The resource a by-ID request names, resolved and checked to be in the caller's scope."""

    resource_type: str
    internal_id: str
    endpoint: str
    """The home path of the resource."""
    resolved: dict[str, str]
    by_value: dict[str, list[str]]

    @property
    def replacements(self) -> dict[str, str]:
        """Internal -> the caller's IDs, for scrubbing home's error text."""
        return {v: k for k, v in self.resolved.items()}


@dataclass
class Call:
    """One domain request being served: for whom, the home's schema, and the IDs in play."""

    domain: Domain
    schema: HomeSchema
    internal_ids: set[str] = field(default_factory=set)
    """The internal IDs in play: those the translation asked about (the guard's in-play set)."""

    @property
    def policy(self) -> DomainPolicy:
        return self.domain.policy

    def scope(self, resource_type: str | None) -> str | None:
        return self.domain.policy.scope_for(resource_type)


class Proxy:
    """The handlers; created once per application with its long-lived parts."""

    def __init__(
        self, *, public_base: str, id_pattern: str, domain_cache_seconds: float = 5.0
    ) -> None:
        self.base = public_base.rstrip("/") + SCIM_PREFIX
        self.id_pattern = IdShape(id_pattern)
        self.domain_cache_seconds = domain_cache_seconds

    def configure(
        self,
        *,
        store: MappingStore,
        domains: DomainStore,
        tokens: TokenStore,
        home: HomeClient,
        guard: LeakGuard,
        sealer: VersionSealer,
        audit: Callable[[str, str, dict[str, Any]], Awaitable[None]],
        on_leak: Callable[[str], None],
    ) -> None:
        """Attach the parts that live from start-up to shutdown (routes exist before them)."""
        self.store = store
        self.domains = domains
        self.tokens = tokens
        self.home = home
        self.guard = guard
        self.sealer = sealer
        self.audit = audit
        self.on_leak = on_leak

    def routes(self) -> list[web.RouteDef]:
        from broker.proxy.bulk import serve_bulk

        p = SCIM_PREFIX
        serve = self._serve
        return [
            web.get(p + "/ServiceProviderConfig", serve("scim:read", self.service_provider_config)),
            web.get(p + "/Schemas", serve("scim:read", self.discovery)),
            web.get(p + "/Schemas/{id}", serve("scim:read", self.discovery)),
            web.get(p + "/ResourceTypes", serve("scim:read", self.discovery)),
            web.get(p + "/ResourceTypes/{id}", serve("scim:read", self.discovery)),
            web.post(p + "/Bulk", serve("scim:write", lambda c, r: serve_bulk(self, c, r))),
            web.post(p + "/.search", serve("scim:read", self.search)),
            web.get(p + "/{endpoint}", serve("scim:read", self.list_resources)),
            web.post(p + "/{endpoint}/.search", serve("scim:read", self.search)),
            web.post(p + "/{endpoint}", serve("scim:write", self.create)),
            web.get(p + "/{endpoint}/{id}", serve("scim:read", self.get)),
            web.put(p + "/{endpoint}/{id}", serve("scim:write", self.replace)),
            web.patch(p + "/{endpoint}/{id}", serve("scim:write", self.patch)),
            web.delete(p + "/{endpoint}/{id}", serve("scim:write", self.delete)),
        ]

    # ------------------------------------------------------------------ plumbing

    def _serve(
        self, scope: str, handler: Callable[[Call, web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """A route's handler: authenticate, then serve; a refusal after authentication is a
        SCIM error that goes through the leak guard like any other answer."""

        async def serve(request: web.Request) -> web.Response:
            principal = await self.tokens.authenticate(request.headers.get("Authorization"))
            principal.require(scope)
            domain = await self.domains.cached(principal.domain_id, self.domain_cache_seconds)
            call = Call(domain, await self.home.schema())
            try:
                return await handler(call, request)
            except BrokerError as exc:
                body = error_document(exc.status, exc.detail, exc.scim_type)
                response = await self._respond(call, exc.status, body)
                if exc.status == 401:
                    response.headers["WWW-Authenticate"] = 'Bearer realm="scim-id-broker"'
                return response

        return serve

    def _resource_type(self, call: Call, request: web.Request) -> str:
        endpoint = request.match_info["endpoint"]
        if endpoint.lower() in _DISCOVERY:
            raise BrokerError(f"{request.method} is not allowed on /{endpoint}", status=405)
        resource_type = call.schema.endpoints.type_of(endpoint)
        if resource_type is None:
            raise NotFoundError(f"no such endpoint /{endpoint}")
        return resource_type

    async def _body(self, request: web.Request) -> Any:
        """Step 2's parse: strict UTF-8 JSON, bounded, no duplicate keys (see canonical.py)."""
        if request.content_type not in _ACCEPTED_TYPES:
            raise UnsupportedMediaType(
                f"send the body as application/scim+json (got {request.content_type or 'no Content-Type'})"
            )
        return parse_body(await request.read())

    async def _resolve(
        self, call: Call, ids: Iterable[str], values: Iterable[str] = ()
    ) -> tuple[dict[str, str], dict[str, list[str]]]:
        resolved, by_value = await self.store.resolve_request(call.domain.id, ids, values)
        call.internal_ids.update(resolved.values())
        for internals in by_value.values():
            call.internal_ids.update(internals)
        return resolved, by_value

    async def _target(
        self,
        call: Call,
        request: web.Request,
        extra: FilterIds | None = None,
        *,
        check_scope: bool = True,
    ) -> _Target:
        """The path's resource: 404 without asking home if the caller has no such ID, and 404 if
        it is out of the caller's scope."""
        resource_type = self._resource_type(call, request)
        external = check_text(request.match_info["id"], "the path")
        ids = [external, *(extra.ids if extra else ())]
        resolved, by_value = await self._resolve(call, ids, extra.external_ids if extra else ())
        if external not in resolved:
            raise NotFoundError(NOT_FOUND)
        internal = resolved[external]
        endpoint = f"{call.schema.endpoints.by_type[resource_type]}/{internal}"
        target = _Target(resource_type, internal, endpoint, resolved, by_value)
        if check_scope and call.scope(resource_type):
            await self._fetch(call, target, {"attributes": "id"})
        return target

    async def _visible(
        self, call: Call, resource: dict[str, Any], resource_type: str
    ) -> dict[str, Any]:
        """One home resource as the caller sees it (404 if it cannot see it)."""
        (out,) = await self._outbound(call, [resource], resource_type)
        if out is None:
            raise NotFoundError(NOT_FOUND)
        return out

    async def _outbound(
        self, call: Call, docs: list[dict[str, Any]], resource_type: str | None
    ) -> list[dict[str, Any] | None]:
        """Home's resources as the caller sees them (None: invisible to it), one round-trip."""
        outward = self._inward(call.schema).reversed()
        wanted = ids_in_resources(docs, outward, resource_type=resource_type)
        call.internal_ids.update(wanted)
        if call.policy.scope:
            wanted = await self._in_scope(call, wanted, docs, resource_type)
        found = await self.store.translate_outbound(call.domain.id, wanted, mint=call.domain.mints)
        if not call.domain.mints and len(found) < len(wanted):
            # A push peer reads something naming entities it has no account of: split-offs held
            # back until needed are provisioned there now (they show up once created).
            await self.store.provision_on_need(
                call.domain.id, [i for i in wanted if i not in found]
            )
        views = {i: DomainView(o.external_id, o.domain_external_id) for i, o in found.items()}
        out = resources_for_domain(docs, views, outward, resource_type=resource_type)
        # Versions sealed for this domain, timestamps coarsened for an unlinkable one.
        return [
            None
            if o is None
            else present_meta(o, domain=call.domain, internal_id=str(d["id"]), sealer=self.sealer)
            for o, d in zip(out, docs, strict=True)
        ]

    def _etag(self, call: Call, response: HomeResponse, internal_id: str) -> dict[str, str]:
        """Home's ETag header as the caller sees it: sealed for it and this resource."""
        etag = present_etag(
            response.headers.get("ETag"),
            domain=call.domain.id,
            internal_id=internal_id,
            sealer=self.sealer,
        )
        return {"ETag": etag} if etag else {}

    def _condition(
        self, call: Call, request: web.Request, header: str, internal_id: str
    ) -> dict[str, str] | None:
        """An ``If-Match`` / ``If-None-Match`` the caller sent, opened back into home's version
        ({} when it sent none; None when none of its tags is one the broker issued to it for
        this resource: nothing can match)."""
        if header not in request.headers:
            return {}
        value = home_condition(
            check_text(request.headers[header], header),
            domain=call.domain.id,
            internal_id=internal_id,
            sealer=self.sealer,
        )
        return {header: value} if value is not None else None

    def _if_match(self, call: Call, request: web.Request, target: _Target) -> dict[str, str]:
        """``If-Match`` for home; 412 without asking home if it names no version of ours."""
        condition = self._condition(call, request, "If-Match", target.internal_id)
        if condition is None:
            raise PreconditionFailedError()
        return condition

    def _inward(self, schema: HomeSchema) -> Translation:
        """Rewriting from the caller's view (the broker's base) to home's."""
        return Translation(schema.refs, schema.endpoints, self.base, self.home.base_url)

    def _readable(
        self, call: Call, doc: dict[str, Any], resource_type: str | None
    ) -> dict[str, Any]:
        if resource_type is None:
            meta = doc.get("meta")
            found = meta.get("resourceType") if isinstance(meta, dict) else None
            resource_type = found if isinstance(found, str) else None
        return call.policy.readable(doc, call.schema.attributes.get(resource_type))

    async def _in_scope(
        self,
        call: Call,
        wanted: dict[str, str | None],
        docs: list[dict[str, Any]],
        resource_type: str | None,
    ) -> dict[str, str | None]:
        """``wanted`` less the users out of the caller's scope: they do not exist for it, not
        even as a member or a manager. One search at home (two if some IDs have no type)."""
        own = (
            {d["id"] for d in docs if isinstance(d.get("id"), str)}
            if resource_type == "User"
            else set()
        )
        candidates = [i for i, t in wanted.items() if t in (None, "User") and i not in own]
        if not candidates:
            return wanted
        visible = await self._visible_ids(call, candidates, {i: wanted[i] for i in candidates})
        return {i: t for i, t in wanted.items() if i not in candidates or i in visible}

    async def _visible_ids(
        self, call: Call, ids: list[str], types: Mapping[str, str | None]
    ) -> set[str]:
        """Which of ``ids`` (users, or of no known type) the caller can see: users within its
        scope, and groups."""
        users = await self._existing(call, "User", ids, call.scope("User"))
        untyped = [i for i in ids if types.get(i) is None and i not in users]
        others = await self._existing(call, "Group", untyped, None) if untyped else set()
        return users | others

    async def _existing(
        self, call: Call, resource_type: str, ids: list[str], scope: str | None
    ) -> set[str]:
        """Which of ``ids`` home has as ``resource_type`` (within ``scope``)."""
        if resource_type not in call.schema.endpoints.by_type or not ids:
            return set()
        try:
            return await self.home.ids_within(
                call.schema.endpoints.by_type[resource_type], ids, scope
            )
        except HomeRefused as exc:
            raise self._home_error(call, exc.response, {}) from exc

    async def _references_in_scope(
        self, call: Call, named: Mapping[str, str | None], resolved: Mapping[str, str]
    ) -> None:
        """Step 3 for references: a write may name only what the caller can see. A user out of
        its scope is refused exactly like an unknown ID (400 invalidValue)."""
        if not call.policy.scope:
            return
        internal = {
            resolved[i]: t for i, t in named.items() if i in resolved and t in (None, "User")
        }
        if not internal:
            return
        visible = await self._visible_ids(call, list(internal), internal)
        for external, rtype in named.items():
            if (
                rtype in (None, "User")
                and external in resolved
                and resolved[external] not in visible
            ):
                raise InvalidValueError(f"{external!r} does not name a resource you can refer to")

    def _canonical(self, call: Call, doc: Any, resource: ResourceSchema) -> CanonicalResource:
        """Step 2 and 3 for a resource a domain writes: canonical form, then the write list."""
        canonical = canonical_resource(doc, resource)
        check_write(call.policy, resource, canonical.written)
        return canonical

    async def _inbound(
        self, call: Call, canonical: CanonicalResource, extra: Iterable[str] = ()
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Step 4 inbound: the resource for home, every reference translated (400 if one does
        not translate or names what the caller cannot see)."""
        inward = self._inward(call.schema)
        names = collect_ids(canonical.attrs, inward)
        resolved, _ = await self._resolve(call, [*names, *extra])
        await self._references_in_scope(call, names, resolved)
        translate: IdVisitor = lambda i, _t: resolved.get(i)  # noqa: E731
        return rewrite_document(canonical.attrs, inward, translate, strict=True), resolved

    async def _respond(
        self, call: Call, status: int, body: Any, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        """Step 5: the response a domain gets, after the leak guard (errors too)."""
        raw = orjson.dumps(body) if body is not None else b""
        text = raw.decode()
        parts = [("body", text), *((f"header {k}", v) for k, v in (headers or {}).items())]
        # The IDs in play are those the translation asked about, never anything the request
        # held; the caller's own IDs are what it is meant to see.
        leak = await self.guard.check(parts, in_play=call.internal_ids)
        if leak is not None:
            correlation = uuid.uuid4().hex[:12]
            log.error(
                "leak guard blocked a response to %s in %s: %s (correlation ID %s)",
                call.domain.id,
                leak.where,
                leak.reason,
                correlation,
            )
            self.on_leak(call.domain.id)
            await self.audit(
                call.domain.id,
                "leak_blocked",
                {"where": leak.where, "reason": leak.reason, "correlation_id": correlation},
            )
            return error_response(
                502,
                "the broker withheld a response that would have exposed an internal identifier "
                f"(correlation ID {correlation}); the operator has been told",
            )
        response = web.Response(
            status=status, body=raw if body is not None else None, headers=dict(headers or {})
        )
        if body is not None:
            response.content_type = SCIM_JSON
        return response

    def _home_error(
        self, call: Call, response: HomeResponse, replacements: dict[str, str]
    ) -> BrokerError:
        """An error from home, translated for the caller: status and scimType kept, detail scrubbed."""
        body = response.body if isinstance(response.body, dict) else {}
        if response.status == 404:
            return NotFoundError(NOT_FOUND)
        if response.status < 400:
            # A success the broker cannot use (no body, not a resource): not the caller's fault.
            return BrokerError(
                f"the home SCIM service answered {response.status} without the expected resource; "
                "try again, and tell the broker's operator if it persists",
                status=502,
            )
        # Internal IDs in play that the caller has no name for are masked too, whatever shape.
        known = {i: "[id]" for i in call.internal_ids if i} | replacements
        detail = scrub(
            str(body.get("detail") or f"the home SCIM service answered {response.status}"),
            known,
            self.id_pattern,
        )
        scim_type = body.get("scimType") if isinstance(body.get("scimType"), str) else None
        status = response.status if 400 <= response.status < 600 else 502
        return BrokerError(detail, status=status, scim_type=scim_type)

    # ------------------------------------------------------------------ reads

    async def get(self, call: Call, request: web.Request) -> web.Response:
        params = _query(request, GET_PARAMS)
        target = await self._target(call, request, check_scope=False)
        condition = self._condition(call, request, "If-None-Match", target.internal_id)
        if condition and not call.scope(target.resource_type):
            # RFC 7644 section 3.14: home decides; a 304 carries no body, only the version.
            response = await self.home.request("GET", target.endpoint, headers=condition)
            if response.status == 304:
                etag = self._etag(call, response, target.internal_id)
                return await self._respond(call, 304, None, etag)
        resource = await self._fetch(call, target, params)
        out = await self._visible(call, resource, target.resource_type)
        readable = self._readable(call, out, target.resource_type)
        return await self._respond(call, 200, readable, _etag(out))

    async def _fetch(
        self, call: Call, target: _Target, params: Mapping[str, str]
    ) -> dict[str, Any]:
        """One home resource, as long as it is in the caller's scope (404 otherwise)."""
        scope = call.scope(target.resource_type)
        if scope:
            scoped = {**params, "filter": f"id eq {json.dumps(target.internal_id)} and ({scope})"}
            endpoint = call.schema.endpoints.by_type[target.resource_type]
            response = await self.home.request("GET", endpoint, params=scoped)
            if response.status != 200:
                raise self._home_error(call, response, target.replacements)
            resources = (
                response.body.get("Resources", []) if isinstance(response.body, dict) else []
            )
            if not resources:
                raise NotFoundError(NOT_FOUND)
            return dict(resources[0])
        response = await self.home.request("GET", target.endpoint, params=params)
        if response.status != 200 or not isinstance(response.body, dict):
            raise self._home_error(call, response, target.replacements)
        return response.body

    async def list_resources(self, call: Call, request: web.Request) -> web.Response:
        resource_type = self._resource_type(call, request)
        return await self._query(call, resource_type, _query(request, LIST_PARAMS), post=False)

    async def search(self, call: Call, request: web.Request) -> web.Response:
        resource_type = (
            self._resource_type(call, request) if "endpoint" in request.match_info else None
        )
        body = await self._body(request)
        if not isinstance(body, dict):
            raise _syntax("a search body is a JSON object (RFC 7644 section 3.4.3)")
        by_lower = {p.lower(): p for p in (*LIST_PARAMS, "schemas")}
        params: dict[str, Any] = {}
        for key, value in body.items():
            name = by_lower.get(key.lower())
            if name is None:
                raise _syntax(f"a search request has no parameter {key!r} (RFC 7644 section 3.4.3)")
            if name in params:
                raise _syntax(f"{name} is given twice")
            params[name] = value
        params.pop("schemas", None)
        return await self._query(call, resource_type, params, post=True)

    async def _query(
        self, call: Call, resource_type: str | None, params: dict[str, Any], *, post: bool
    ) -> web.Response:
        schema = call.schema
        resources_searched = (
            [schema.resource(resource_type)]
            if resource_type
            else list(schema.attributes.by_type.values())
        )
        sort_by = params.get("sortBy")
        if sort_by is not None:
            if not isinstance(sort_by, str):
                raise InvalidValueError("sortBy must be a string")
            check_sort(call.policy, resources_searched, sort_by)
        user_filter = params.get("filter")
        parts = []
        if isinstance(user_filter, str) and user_filter.strip():
            ast = parse_filter(user_filter)
            check_filter(call.policy, resources_searched, ast)
            named = filter_ids(ast, self._inward(schema))
            resolved, by_value = await self._resolve(call, named.ids, named.external_ids)
            rewritten = rewrite_filter(
                ast, self._inward(schema), ids=resolved, external_ids=by_value
            )
            parts.append(str(rewritten))
        elif user_filter is not None and not isinstance(user_filter, str):
            raise FilterError("filter must be a string")
        if call.policy.scope and resource_type is None:
            raise ForbiddenError(
                f"domain {call.domain.id} sees a scope of users: search /Users/.search or "
                "/Groups/.search instead of the root"
            )
        scope = call.scope(resource_type)
        if scope:
            parts.append(scope)
        if parts:
            params["filter"] = " and ".join(f"({p})" for p in parts) if len(parts) > 1 else parts[0]
        if post:
            path = (schema.endpoints.by_type[resource_type] if resource_type else "") + "/.search"
            response = await self.home.request(
                "POST", path, body={"schemas": [SEARCH_SCHEMA], **params}
            )
        else:
            path = schema.endpoints.by_type[resource_type] if resource_type else "/"
            response = await self.home.request(
                "GET", path, params={k: str(v) for k, v in params.items()}
            )
        if response.status != 200 or not isinstance(response.body, dict):
            raise self._home_error(call, response, {})
        resources = [r for r in response.body.get("Resources", []) if isinstance(r, dict)]
        translated = await self._outbound(call, resources, resource_type)
        visible = [self._readable(call, r, resource_type) for r in translated if r is not None]
        hidden = len(resources) - len(visible)
        total = response.body.get("totalResults", len(visible))
        start = response.body.get("startIndex", 1)
        body = {
            "schemas": [LIST_SCHEMA],
            "totalResults": max(0, (total if isinstance(total, int) else len(visible)) - hidden),
            "itemsPerPage": len(visible),
            "startIndex": start if isinstance(start, int) else 1,
            "Resources": visible,
        }
        return await self._respond(call, 200, body)

    # ------------------------------------------------------------------ writes

    async def create(self, call: Call, request: web.Request) -> web.Response:
        resource_type = self._resource_type(call, request)
        if call.domain.push:
            raise ForbiddenError(
                f"domain {call.domain.id} is a push domain: the broker provisions into it and its IDs "
                "are the ones it assigns; create the resource in home instead"
            )
        resource = call.schema.resource(resource_type)
        sent = await self._body(request)
        canonical = self._canonical(call, sent, resource)
        scope = call.scope(resource_type)
        check_create_scope(
            call.policy, parse_filter(scope) if scope else None, canonical.attrs, resource
        )
        doc, _ = await self._inbound(call, canonical)
        response = await self.home.request(
            "POST", call.schema.endpoints.by_type[resource_type], body=doc
        )
        if (
            response.status != 201
            or not isinstance(response.body, dict)
            or not isinstance(response.body.get("id"), str)
        ):
            raise self._home_error(call, response, {})
        out = await self._visible(call, response.body, resource_type)  # records and mints
        internal = response.body["id"]
        external_id = canonical.external_id
        await self.store.record_write(
            {internal: resource_type},
            origin=call.domain.id,
            external_ids={internal: external_id[0]} if external_id else None,
            write_only={
                internal: write_only_values("POST", canonical.attrs, call.schema.write_only)
            },
            verb="create",
            documents={internal: response.body},
        )
        if external_id is not None and external_id[0] is not None:
            out["externalId"] = external_id[0]
        readable = self._readable(call, out, resource_type)
        headers = _etag(out)
        headers["Location"] = call.schema.endpoints.uri(self.base, resource_type, out["id"])
        return await self._respond(call, 201, readable, headers)

    async def replace(self, call: Call, request: web.Request) -> web.Response:
        resource_type = self._resource_type(call, request)
        resource = call.schema.resource(resource_type)
        canonical = self._canonical(call, await self._body(request), resource)
        if call.policy.write is not None:
            # A PUT replaces every attribute: one that may write only some changes those only,
            # as the PATCH they amount to (the others, a password included, stay as they are).
            target = await self._target(call, request)
            current = await self._fetch(call, target, {})
            patch = put_as_patch(canonical, call.policy, resource, current)
            return await self._patch_flow(
                call, request, target.resource_type, patch, canonical.external_id
            )
        target = await self._target(call, request)
        doc, _ = await self._inbound(call, canonical)
        if call.policy.scope and target.resource_type == "Group":
            members, hidden = await self._hidden_members(call, target)
            doc = keep_hidden_in_document(doc, members, hidden)
        response = await self.home.request(
            "PUT", target.endpoint, body=doc, headers=self._if_match(call, request, target)
        )
        if response.status != 200 or not isinstance(response.body, dict):
            raise self._home_error(call, response, target.replacements)
        write_only = write_only_values("PUT", canonical.attrs, call.schema.write_only)
        await self._record(call, target, canonical.external_id, write_only, "put", response.body)
        out = await self._visible(call, response.body, target.resource_type)
        readable = self._readable(call, out, target.resource_type)
        return await self._respond(call, 200, readable, _headers(out))

    async def patch(self, call: Call, request: web.Request) -> web.Response:
        resource_type = self._resource_type(call, request)
        resource = call.schema.resource(resource_type)
        canonical = canonical_patch(await self._body(request), resource)
        check_write(call.policy, resource, canonical.written)
        for ref in canonical.filtered:
            if not call.policy.may_read(ref, resource):
                raise FilterError(
                    f"domain {call.domain.id} may not read {ref}, so it cannot select its values"
                )
        if call.policy.scope and resource_type == "Group":
            for target in canonical.targets:
                named = target and target.ref == AttrRef(None, "members") and target.filter
                if named and target and target.filter and not members_by_value(target.filter):
                    raise FilterError(
                        f"domain {call.domain.id} sees a scope of users: select members "
                        'by value only (members[value eq "..."])'
                    )
        return await self._patch_flow(
            call, request, resource_type, parse_patch(canonical.body), None
        )

    async def _patch_flow(
        self,
        call: Call,
        request: web.Request,
        resource_type: str,
        patch: PatchRequest,
        external_id: tuple[str | None] | None,
    ) -> web.Response:
        schema = call.schema
        inward = self._inward(schema)
        named = patch.ids(inward)
        target = await self._target(call, request, named)
        await self._references_in_scope(call, named.ids, target.resolved)
        external_id = patch.external_id if patch.external_id is not None else external_id
        resource: dict[str, Any] | None = None
        status = 200
        if patch.operations:
            body = patch.rewrite(
                inward,
                translate=lambda i, _t: target.resolved.get(i),
                ids=target.resolved,
                external_ids=target.by_value,
            )
            if call.policy.scope and target.resource_type == "Group":
                current, hidden = await self._hidden_members(call, target)
                body["Operations"] = keep_hidden_members(body["Operations"], current, hidden)
            response = await self.home.request(
                "PATCH",
                target.endpoint,
                params=_query(request, GET_PARAMS),
                body=body,
                headers=self._if_match(call, request, target),
            )
            if response.status not in (200, 204):
                raise self._home_error(call, response, target.replacements)
            status = response.status
            resource = response.body if isinstance(response.body, dict) else None
            if resource is None and await self.store.events_subscribed():
                # Home answered 204: its resource after the change tells the SETs what changed.
                resource = await self._fetch(call, target, {})
            write_only = write_only_values("PATCH", body, schema.write_only)
        else:
            write_only = {}
        if patch.operations or external_id is not None:
            await self._record(call, target, external_id, write_only, "patch", resource)
        if patch.operations and status == 204 and external_id is None:
            etag = self._etag(call, response, target.internal_id)
            return await self._respond(call, 204, None, etag)
        if resource is None:
            resource = await self._fetch(call, target, {})
        out = await self._visible(call, resource, target.resource_type)
        readable = self._readable(call, out, target.resource_type)
        return await self._respond(call, 200, readable, _etag(out))

    async def _hidden_members(self, call: Call, target: _Target) -> tuple[list[str], set[str]]:
        """A group's members at home now, and those of them the caller cannot see."""
        group = await self._fetch(call, target, {"attributes": "members"})
        current: list[str] = []
        types: dict[str, str | None] = {}
        for member in group.get("members") or []:
            value = member.get("value") if isinstance(member, dict) else None
            if isinstance(value, str):
                current.append(value)
                kind = member.get("type")
                types[value] = kind if isinstance(kind, str) and kind in ("User", "Group") else None
        users = [i for i in current if types[i] in (None, "User")]
        visible = await self._visible_ids(call, users, types) if users else set()
        return current, {i for i in users if i not in visible}

    async def delete(self, call: Call, request: web.Request) -> web.Response:
        target = await self._target(call, request)
        response = await self.home.request(
            "DELETE", target.endpoint, headers=self._if_match(call, request, target)
        )
        if response.status != 204:
            raise self._home_error(call, response, target.replacements)
        await self.store.record_write({}, origin=call.domain.id, deleted=[target.internal_id])
        return await self._respond(call, 204, None)

    async def _record(
        self,
        call: Call,
        target: _Target,
        external_id: tuple[str | None] | None,
        write_only: Mapping[str, Any],
        verb: str,
        document: dict[str, Any] | None,
    ) -> None:
        """A change the caller made to an existing resource (home's resource after it, if
        known): its externalId, and the syncs and SETs the change implies, with the write-only
        values it set, in one transaction."""
        await self.store.record_write(
            {target.internal_id: target.resource_type},
            origin=call.domain.id,
            external_ids={target.internal_id: external_id[0]} if external_id else None,
            write_only={target.internal_id: write_only},
            verb=verb,
            documents={target.internal_id: document} if document else None,
        )

    # ------------------------------------------------------------------ discovery

    async def service_provider_config(self, call: Call, request: web.Request) -> web.Response:
        response = await self.home.request("GET", "/ServiceProviderConfig")
        if response.status != 200 or not isinstance(response.body, dict):
            raise self._home_error(call, response, {})
        config = self._relocate(response.body)
        # Domains authenticate to the broker, with its bearer tokens, not to home.
        config["authenticationSchemes"] = [
            {
                "type": "oauthbearertoken",
                "name": "Bearer token",
                "description": "A token the broker's operator issues with `broker token issue DOMAIN`",
                "primary": True,
            }
        ]
        home_bulk = config.get("bulk") if isinstance(config.get("bulk"), dict) else {}
        from broker.proxy.bulk import MAX_BULK_OPERATIONS
        from broker.responses import MAX_BODY

        config["bulk"] = {
            "supported": bool(home_bulk.get("supported")),
            "maxOperations": min(_int(home_bulk.get("maxOperations")), MAX_BULK_OPERATIONS),
            "maxPayloadSize": min(_int(home_bulk.get("maxPayloadSize")), MAX_BODY),
        }
        # The broker's own change notification (RFC 9967 section 4), not home's, shown to a
        # domain subscribed to it: clients that predate RFC 9967 refuse the attribute.
        config.pop("securityEvents", None)
        if await self.store.subscribed(call.domain.id):
            config.update(service_provider_config_events())
        return await self._respond(call, 200, config)

    async def discovery(self, call: Call, request: web.Request) -> web.Response:
        """``/Schemas`` and ``/ResourceTypes``, or one of them named by a known schema URN or
        resource-type name: nothing else is ever asked of home on this route."""
        collection = (
            "Schemas" if request.path.startswith(SCIM_PREFIX + "/Schemas") else "ResourceTypes"
        )
        path = f"/{collection}"
        if "id" in request.match_info:
            name = request.match_info["id"]
            known = (
                call.schema.schema_ids
                if collection == "Schemas"
                else {t.lower() for t in call.schema.attributes.by_type}
            )
            if name.lower() not in known:
                raise NotFoundError(f"no such {collection[:-1].lower()} {name!r}")
            path += "/" + quote(name, safe=":")
        response = await self.home.request("GET", path)
        if response.status != 200:
            raise self._home_error(call, response, {})
        return await self._respond(call, 200, self._relocate(response.body))

    def _relocate(self, body: Any) -> Any:
        """Discovery documents with home's URLs moved to the broker's (they hold no IDs)."""
        return json.loads(
            json.dumps(body).replace(
                json.dumps(self.home.base_url)[1:-1], json.dumps(self.base)[1:-1]
            )
        )


def _query(request: web.Request, names: Iterable[str]) -> dict[str, Any]:
    """The query parameters ``names`` the request gives: each at most once and free of control
    characters; any other parameter is ignored."""
    picked: dict[str, Any] = {}
    for name in names:
        values = request.query.getall(name, [])
        if len(values) > 1:
            raise InvalidValueError(f"give the query parameter {name} once")
        if values:
            picked[name] = check_text(values[0], f"the query parameter {name}")
    return picked


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _etag(resource: Mapping[str, Any]) -> dict[str, str]:
    version = (
        resource.get("meta", {}).get("version") if isinstance(resource.get("meta"), dict) else None
    )
    return {"ETag": version} if isinstance(version, str) else {}


def _headers(resource: Mapping[str, Any]) -> dict[str, str]:
    """ETag and Location of a resource as the caller sees it (both in its terms)."""
    headers = _etag(resource)
    meta = resource.get("meta")
    location = meta.get("location") if isinstance(meta, dict) else None
    if isinstance(location, str):
        headers["Location"] = location
    return headers


def _syntax(detail: str) -> BrokerError:
    return InvalidValueError(detail, scim_type="invalidSyntax")
