"""The domain-facing SCIM endpoint (RFC 7644) at ``{public_url}/scim/v2``.

Each handler alternates: translate the request inbound (one database round-trip), forward it to
home, translate the response outbound (one round-trip), pass it through the leak guard. The
rewriting itself is pure (``broker.scim``); this module only wires it to HTTP and the store.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from broker.domains import Domain, DomainStore
from broker.errors import BrokerError, ForbiddenError, InvalidValueError, NotFoundError
from broker.events.sets import service_provider_config_events
from broker.home import (
    SEARCH_SCHEMA,
    HomeClient,
    HomeRefused,
    HomeResponse,
    HomeSchema,
)
from broker.http import SCIM_JSON
from broker.mapping.store import MappingStore
from broker.responses import (
    MAX_BODY,
    SCIM_PREFIX,
    UnsupportedMediaType,
    error_document,
    error_response,
)
from broker.scim.bulk import bulk_write_only, bulk_writes
from broker.scim.filters import FilterError, FilterIds, filter_ids, parse_filter, rewrite_filter
from broker.scim.guard import IdShape, find_leak, scrub
from broker.scim.outbound import DomainView, ids_in_resources, resources_for_domain
from broker.scim.patch import parse_patch
from broker.scim.rewrite import Endpoints, IdVisitor, Translation, collect_ids, rewrite_document
from broker.scim.writeonly import write_only_values
from broker.tokens import TokenStore

__all__ = ["Proxy"]

log = logging.getLogger(__name__)

LIST_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
BULK_REQUEST = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
BULK_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:BulkResponse"
MAX_BULK_OPERATIONS = 1000
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
_DISCOVERY = {"ServiceProviderConfig", "Schemas", "ResourceTypes", "Bulk"}
_ACCEPTED_TYPES = {"application/scim+json", "application/json"}


@dataclass(frozen=True)
class _Incoming:
    doc: dict[str, Any]
    external_id: tuple[str | None] | None
    names: dict[str, str | None]


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
class _Call:
    """One domain request being served: for whom, and the IDs in play."""

    domain: Domain
    request_text: str
    internal_ids: set[str] = field(default_factory=set)
    allowed: set[str] = field(default_factory=set)


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
        audit: Callable[[str, str, dict[str, Any]], Awaitable[None]],
        on_leak: Callable[[str], None],
    ) -> None:
        """Attach the parts that live from start-up to shutdown (routes exist before them)."""
        self.store = store
        self.domains = domains
        self.tokens = tokens
        self.home = home
        self.audit = audit
        self.on_leak = on_leak

    def routes(self) -> list[web.RouteDef]:
        p = SCIM_PREFIX
        return [
            web.get(p + "/ServiceProviderConfig", self.service_provider_config),
            web.get(p + "/Schemas", self.discovery),
            web.get(p + "/Schemas/{id}", self.discovery),
            web.get(p + "/ResourceTypes", self.discovery),
            web.get(p + "/ResourceTypes/{id}", self.discovery),
            web.post(p + "/Bulk", self.bulk),
            web.post(p + "/.search", self.search),
            web.get(p + "/{endpoint}", self.list_resources),
            web.post(p + "/{endpoint}/.search", self.search),
            web.post(p + "/{endpoint}", self.create),
            web.get(p + "/{endpoint}/{id}", self.get),
            web.put(p + "/{endpoint}/{id}", self.replace),
            web.patch(p + "/{endpoint}/{id}", self.patch),
            web.delete(p + "/{endpoint}/{id}", self.delete),
        ]

    # ------------------------------------------------------------------ plumbing

    async def _call(self, request: web.Request, scope: str) -> _Call:
        principal = await self.tokens.authenticate(request.headers.get("Authorization"))
        principal.require(scope)
        domain = await self._domain(principal.domain_id)
        body = await request.text() if request.can_read_body else ""
        return _Call(domain, f"{request.path_qs}\n{body}")

    async def _domain(self, domain_id: str) -> Domain:
        return await self.domains.cached(domain_id, self.domain_cache_seconds)

    async def _resource_type(self, request: web.Request) -> str:
        schema = await self.home.schema()
        endpoint = request.match_info["endpoint"]
        if endpoint in _DISCOVERY:
            raise BrokerError(f"{request.method} is not allowed on /{endpoint}", status=405)
        resource_type = schema.endpoints.type_of(endpoint)
        if resource_type is None:
            raise NotFoundError(f"no such endpoint /{endpoint}")
        return resource_type

    async def _json_body(self, request: web.Request) -> Any:
        if request.content_type not in _ACCEPTED_TYPES:
            raise UnsupportedMediaType(
                f"send the body as application/scim+json (got {request.content_type or 'no Content-Type'})"
            )
        text = await request.text()
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise _syntax(f"the body is not valid JSON: {exc}") from exc

    async def _resolve(
        self, call: _Call, ids: Iterable[str], values: Iterable[str] = ()
    ) -> tuple[dict[str, str], dict[str, list[str]]]:
        resolved, by_value = await self.store.resolve_request(call.domain.id, ids, values)
        call.internal_ids.update(resolved.values())
        for internals in by_value.values():
            call.internal_ids.update(internals)
        return resolved, by_value

    async def _resolve_path_id(
        self, call: _Call, request: web.Request, extra: FilterIds | None = None
    ) -> tuple[str, dict[str, str], dict[str, list[str]]]:
        """The internal ID the path names (404 without asking home if it names none)."""
        external = request.match_info["id"]
        ids = [external, *(extra.ids if extra else ())]
        resolved, by_value = await self._resolve(call, ids, extra.external_ids if extra else ())
        if external not in resolved:
            raise NotFoundError(NOT_FOUND)
        return resolved[external], resolved, by_value

    async def _target(
        self,
        call: _Call,
        request: web.Request,
        extra: FilterIds | None = None,
        *,
        check_scope: bool = True,
    ) -> _Target:
        """The path's resource: 404 without asking home if the caller has no such ID, and 404 if
        it is out of the caller's scope."""
        resource_type = await self._resource_type(request)
        internal, resolved, by_value = await self._resolve_path_id(call, request, extra)
        schema = await self.home.schema()
        target = _Target(
            resource_type,
            internal,
            f"{schema.endpoints.by_type[resource_type]}/{internal}",
            resolved,
            by_value,
        )
        if check_scope and _scope(call, resource_type):
            await self._fetch(call, target, {"attributes": "id"})
        return target

    async def _visible(
        self, call: _Call, resource: dict[str, Any], resource_type: str
    ) -> dict[str, Any]:
        """One home resource as the caller sees it (404 if it cannot see it)."""
        (out,) = await self._outbound(call, [resource], resource_type)
        if out is None:
            raise NotFoundError(NOT_FOUND)
        return out

    async def _outbound(
        self, call: _Call, docs: list[dict[str, Any]], resource_type: str | None
    ) -> list[dict[str, Any] | None]:
        """Home's resources as the caller sees them (None: invisible to it), one round-trip."""
        schema = await self.home.schema()
        outward = self._inward(schema).reversed()
        wanted = ids_in_resources(docs, outward, resource_type=resource_type)
        call.internal_ids.update(wanted)
        if call.domain.scope_filter:
            wanted = await self._in_scope(call, wanted, docs, resource_type)
        found = await self.store.translate_outbound(call.domain.id, wanted, mint=call.domain.mints)
        if not call.domain.mints and len(found) < len(wanted):
            # A push peer reads something naming entities it has no account of: split-offs held
            # back until needed are provisioned there now (they show up once created).
            await self.store.provision_on_need(
                call.domain.id, [i for i in wanted if i not in found]
            )
        call.allowed.update(o.external_id for o in found.values())
        call.allowed.update(o.domain_external_id for o in found.values() if o.domain_external_id)
        views = {i: DomainView(o.external_id, o.domain_external_id) for i, o in found.items()}
        return resources_for_domain(docs, views, outward, resource_type=resource_type)

    def _inward(self, schema: HomeSchema) -> Translation:
        """Rewriting from the caller's view (the broker's base) to home's."""
        return Translation(schema.refs, schema.endpoints, self.base, self.home.base_url)

    def _prepare(self, call: _Call, doc: Any, schema: HomeSchema) -> _Incoming:
        """A resource a domain sends, checked: ``id`` and ``meta`` dropped, ``externalId`` taken
        out for the caller's own record, the write policy applied, the IDs it names listed."""
        if not isinstance(doc, dict):
            raise _syntax("the body must be a JSON object: a SCIM resource")
        doc = {k: v for k, v in doc.items() if k.lower() not in ("id", "meta")}
        external_key = next((k for k in doc if k.lower() == "externalid"), None)
        external_id: tuple[str | None] | None = None
        if external_key is not None:
            value = doc.pop(external_key)
            if value is not None and not isinstance(value, str):
                raise InvalidValueError("externalId must be a string")
            external_id = (value,)
        self._check_writable(call.domain, doc)
        names = collect_ids(doc, self._inward(schema))
        return _Incoming(doc, external_id, names)

    def _finish(
        self, incoming: _Incoming, schema: HomeSchema, translate: IdVisitor
    ) -> dict[str, Any]:
        """The resource for home: references translated; an unknown one is UnknownReference."""
        return rewrite_document(incoming.doc, self._inward(schema), translate, strict=True)

    async def _in_scope(
        self,
        call: _Call,
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
        users = await self._existing(call, "User", candidates, _scope(call, "User"))
        untyped = [i for i in candidates if wanted[i] is None and i not in users]
        others = await self._existing(call, "Group", untyped, None) if untyped else set()
        return {i: t for i, t in wanted.items() if i not in candidates or i in users or i in others}

    async def _existing(
        self, call: _Call, resource_type: str, ids: list[str], scope: str | None
    ) -> set[str]:
        """Which of ``ids`` home has as ``resource_type`` (within ``scope``)."""
        schema = await self.home.schema()
        if resource_type not in schema.endpoints.by_type:
            return set()
        try:
            return await self.home.ids_within(schema.endpoints.by_type[resource_type], ids, scope)
        except HomeRefused as exc:
            raise self._home_error(call, exc.response, {}) from exc

    async def _inbound_document(
        self, call: _Call, doc: Any
    ) -> tuple[dict[str, Any], tuple[str | None] | None]:
        schema = await self.home.schema()
        incoming = self._prepare(call, doc, schema)
        resolved, _ = await self._resolve(call, incoming.names)
        return self._finish(incoming, schema, lambda i, _t: resolved.get(i)), incoming.external_id

    def _check_writable(self, domain: Domain, doc: Mapping[str, Any]) -> None:
        allowed = domain.attribute_policy.get("write")
        if allowed is None:
            return
        permitted = {a.lower() for a in allowed} | {"schemas"}
        refused = sorted(k for k in doc if k.lower() not in permitted)
        if refused:
            raise _mutability(f"domain {domain.id} may not write {', '.join(refused)}")

    async def _respond(
        self, call: _Call, status: int, body: Any, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        """The response a domain gets, after the leak guard."""
        text = orjson.dumps(body).decode() if body is not None else ""
        parts = [("body", text), *((f"header {k}", v) for k, v in (headers or {}).items())]
        allowed = call.allowed | set(self.id_pattern.find(call.request_text))
        leak = find_leak(
            parts,
            internal_ids=call.internal_ids - allowed,
            id_pattern=self.id_pattern,
            allowed=allowed,
        )
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
            status=status, text=text if body is not None else None, headers=dict(headers or {})
        )
        if body is not None:
            response.content_type = SCIM_JSON
        return response

    def _home_error(
        self, call: _Call, response: HomeResponse, replacements: dict[str, str]
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
        return BrokerError(detail, status=response.status, scim_type=scim_type)

    # ------------------------------------------------------------------ reads

    async def get(self, request: web.Request) -> web.Response:
        call = await self._call(request, "scim:read")
        target = await self._target(call, request, check_scope=False)
        if "If-None-Match" in request.headers and not _scope(call, target.resource_type):
            # RFC 7644 section 3.14: home decides; a 304 carries no body, only the version.
            headers = {"If-None-Match": request.headers["If-None-Match"]}
            response = await self.home.request("GET", target.endpoint, headers=headers)
            if response.status == 304:
                return await self._respond(call, 304, None, _etag_header(response))
        resource = await self._fetch(call, target, _pick(request.query, GET_PARAMS))
        out = await self._visible(call, resource, target.resource_type)
        return await self._respond(call, 200, call.domain.readable(out), _etag(resource))

    async def _fetch(
        self, call: _Call, target: _Target, params: Mapping[str, str]
    ) -> dict[str, Any]:
        """One home resource, as long as it is in the caller's scope (404 otherwise)."""
        scope = _scope(call, target.resource_type)
        if scope:
            schema = await self.home.schema()
            scoped = {**params, "filter": f"id eq {json.dumps(target.internal_id)} and ({scope})"}
            endpoint = schema.endpoints.by_type[target.resource_type]
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

    async def list_resources(self, request: web.Request) -> web.Response:
        call = await self._call(request, "scim:read")
        resource_type = await self._resource_type(request)
        return await self._query(call, resource_type, _pick(request.query, LIST_PARAMS), post=False)

    async def search(self, request: web.Request) -> web.Response:
        call = await self._call(request, "scim:read")
        resource_type = (
            await self._resource_type(request) if "endpoint" in request.match_info else None
        )
        body = await self._json_body(request)
        if not isinstance(body, dict):
            raise _syntax("a search body is a JSON object (RFC 7644 section 3.4.3)")
        params = {k: body[k] for k in LIST_PARAMS if k in body}
        return await self._query(call, resource_type, params, post=True)

    async def _query(
        self, call: _Call, resource_type: str | None, params: dict[str, Any], *, post: bool
    ) -> web.Response:
        schema = await self.home.schema()
        sort_by = params.get("sortBy")
        if isinstance(sort_by, str) and sort_by.strip().lower().rsplit(":", 1)[-1] in (
            "id",
            "meta.location",
        ):
            # The order of internal IDs is not the caller's to see.
            raise InvalidValueError(
                "sortBy cannot name id through the broker: sort by another attribute"
            )
        user_filter = params.get("filter")
        parts = []
        if isinstance(user_filter, str) and user_filter.strip():
            ast = parse_filter(user_filter)
            named = filter_ids(ast, self._inward(schema))
            resolved, by_value = await self._resolve(call, named.ids, named.external_ids)
            rewritten = rewrite_filter(
                ast, self._inward(schema), ids=resolved, external_ids=by_value
            )
            parts.append(str(rewritten))
        elif user_filter is not None and not isinstance(user_filter, str):
            raise FilterError("filter must be a string")
        if call.domain.scope_filter and resource_type is None:
            raise ForbiddenError(
                f"domain {call.domain.id} sees a scope of users: search /Users/.search or "
                "/Groups/.search instead of the root"
            )
        scope = _scope(call, resource_type)
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
        visible = [call.domain.readable(r) for r in translated if r is not None]
        hidden = len(resources) - len(visible)
        body = {
            "schemas": [LIST_SCHEMA],
            "totalResults": max(0, int(response.body.get("totalResults", len(visible))) - hidden),
            "itemsPerPage": len(visible),
            "startIndex": response.body.get("startIndex", 1),
            "Resources": visible,
        }
        return await self._respond(call, 200, body)

    # ------------------------------------------------------------------ writes

    async def create(self, request: web.Request) -> web.Response:
        call = await self._call(request, "scim:write")
        resource_type = await self._resource_type(request)
        if call.domain.push:
            raise ForbiddenError(
                f"domain {call.domain.id} is a push domain: the broker provisions into it and its IDs "
                "are the ones it assigns; create the resource in home instead"
            )
        sent = await self._json_body(request)
        doc, external_id = await self._inbound_document(call, sent)
        schema = await self.home.schema()
        response = await self.home.request(
            "POST", schema.endpoints.by_type[resource_type], body=doc
        )
        if (
            response.status != 201
            or not isinstance(response.body, dict)
            or not isinstance(response.body.get("id"), str)
        ):
            raise self._home_error(call, response, {})
        out = await self._visible(call, response.body, resource_type)  # records and mints
        await self.store.record_write(
            {response.body["id"]: resource_type},
            origin=call.domain.id,
            external_ids={response.body["id"]: external_id[0]} if external_id else None,
            write_only={response.body["id"]: write_only_values("POST", sent, schema.write_only)},
            verb="create",
            documents={response.body["id"]: response.body},
        )
        if external_id is not None and external_id[0] is not None:
            out["externalId"] = external_id[0]
            call.allowed.add(external_id[0])
        return await self._respond(call, 201, out, _headers(response, out))

    async def replace(self, request: web.Request) -> web.Response:
        call = await self._call(request, "scim:write")
        target = await self._target(call, request)
        sent = await self._json_body(request)
        doc, external_id = await self._inbound_document(call, sent)
        response = await self.home.request(
            "PUT", target.endpoint, body=doc, headers=_if_match(request)
        )
        if response.status != 200 or not isinstance(response.body, dict):
            raise self._home_error(call, response, target.replacements)
        write_only = write_only_values("PUT", sent, (await self.home.schema()).write_only)
        await self._record(call, target, external_id, write_only, "put", response.body)
        out = await self._visible(call, response.body, target.resource_type)
        return await self._respond(call, 200, call.domain.readable(out), _headers(response, out))

    async def patch(self, request: web.Request) -> web.Response:
        call = await self._call(request, "scim:write")
        sent = await self._json_body(request)
        patch = parse_patch(sent)
        schema = await self.home.schema()
        named = patch.ids(self._inward(schema))
        target = await self._target(call, request, named)
        resource: dict[str, Any] | None = None
        if patch.operations:
            body = patch.rewrite(
                self._inward(schema),
                translate=lambda i, _t: target.resolved.get(i),
                ids=target.resolved,
                external_ids=target.by_value,
            )
            response = await self.home.request(
                "PATCH",
                target.endpoint,
                params=_pick(request.query, GET_PARAMS),
                body=body,
                headers=_if_match(request),
            )
            if response.status not in (200, 204):
                raise self._home_error(call, response, target.replacements)
            resource = response.body if isinstance(response.body, dict) else None
            if resource is None and await self.store.events_subscribed():
                # Home answered 204: its resource after the change tells the SETs what changed.
                resource = await self._fetch(call, target, {})
        if patch.operations or patch.external_id is not None:
            write_only = write_only_values("PATCH", sent, schema.write_only)
            await self._record(call, target, patch.external_id, write_only, "patch", resource)
        if patch.operations and response.status == 204 and patch.external_id is None:
            return await self._respond(call, 204, None, _etag_header(response))
        if resource is None:
            resource = await self._fetch(call, target, {})
        out = await self._visible(call, resource, target.resource_type)
        return await self._respond(call, 200, call.domain.readable(out), _etag(resource))

    async def delete(self, request: web.Request) -> web.Response:
        call = await self._call(request, "scim:write")
        target = await self._target(call, request)
        response = await self.home.request("DELETE", target.endpoint, headers=_if_match(request))
        if response.status != 204:
            raise self._home_error(call, response, target.replacements)
        await self.store.record_write({}, origin=call.domain.id, deleted=[target.internal_id])
        return await self._respond(call, 204, None)

    async def _record(
        self,
        call: _Call,
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

    async def service_provider_config(self, request: web.Request) -> web.Response:
        call = await self._call(request, "scim:read")
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
        config["bulk"] = {
            "supported": bool(home_bulk.get("supported")),
            "maxOperations": min(int(home_bulk.get("maxOperations") or 0), MAX_BULK_OPERATIONS),
            "maxPayloadSize": min(int(home_bulk.get("maxPayloadSize") or 0), MAX_BODY),
        }
        # The broker's own change notification (RFC 9967 section 4), not home's, shown to a
        # domain subscribed to it: clients that predate RFC 9967 refuse the attribute.
        config.pop("securityEvents", None)
        if await self.store.subscribed(call.domain.id):
            config.update(service_provider_config_events())
        return await self._respond(call, 200, config)

    async def discovery(self, request: web.Request) -> web.Response:
        call = await self._call(request, "scim:read")
        path = request.path[len(SCIM_PREFIX) :]
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

    async def bulk(self, request: web.Request) -> web.Response:
        """RFC 7644 section 3.7: every operation translated, ``bulkId:`` references kept for home
        to resolve, one inbound and one outbound round-trip for the whole request."""
        call = await self._call(request, "scim:write")
        body = await self._json_body(request)
        schema = await self.home.schema()
        ops = _bulk_operations(body)
        if call.domain.push and any(op["method"] == "POST" for op in ops):
            raise ForbiddenError(
                f"domain {call.domain.id} is a push domain: it cannot create through the broker"
            )
        bulk_ids = {op["bulkId"] for op in ops if isinstance(op.get("bulkId"), str)}

        def is_bulk_ref(value: str) -> bool:
            return value.startswith("bulkId:") and value[len("bulkId:") :] in bulk_ids

        # Read every operation and list every ID it names, then resolve them all at once.
        planned: list[tuple[dict[str, Any], str, str | None, Any]] = []
        names: set[str] = set()
        values: set[str] = set()
        for n, op in enumerate(ops, start=1):
            resource_type, path_id = _bulk_path(op, schema.endpoints, n)
            if path_id is not None and not is_bulk_ref(path_id):
                names.add(path_id)
            content: Any = None
            if op["method"] in ("POST", "PUT"):
                content = self._prepare(call, op.get("data"), schema)
                names.update(i for i in content.names if not is_bulk_ref(i))
            elif op["method"] == "PATCH":
                content = parse_patch(op.get("data"))
                named = content.ids(self._inward(schema))
                names.update(i for i in named.ids if not is_bulk_ref(i))
                values.update(named.external_ids)
            planned.append((op, resource_type, path_id, content))
        resolved, by_value = await self._resolve(call, names, values)

        def translate(value: str, _rtype: str | None) -> str | None:
            return value if is_bulk_ref(value) else resolved.get(value)

        forwarded: list[dict[str, Any]] = []
        results: list[dict[str, Any] | None] = []  # None: filled from home's answer, in order
        for op, resource_type, path_id, content in planned:
            endpoint = schema.endpoints.by_type[resource_type]
            internal = path_id if path_id is None or is_bulk_ref(path_id) else resolved.get(path_id)
            if path_id is not None and internal is None:
                results.append(_bulk_result(op, 404, error_document(404, NOT_FOUND)))
                continue
            home_op: dict[str, Any] = {
                "method": op["method"],
                "path": endpoint + (f"/{internal}" if internal else ""),
            }
            for key in ("bulkId", "version"):
                if key in op:
                    home_op[key] = op[key]
            try:
                if isinstance(content, _Incoming):
                    home_op["data"] = self._finish(content, schema, translate)
                elif content is not None:
                    home_op["data"] = content.rewrite(
                        self._inward(schema),
                        translate=translate,
                        ids=resolved,
                        external_ids=by_value,
                    )
            except BrokerError as exc:
                results.append(
                    _bulk_result(
                        op, exc.status, error_document(exc.status, exc.detail, exc.scim_type)
                    )
                )
                continue
            forwarded.append(home_op)
            results.append(None)
        answers: list[dict[str, Any]] = []
        if forwarded:
            request_body = {"schemas": [BULK_REQUEST], "Operations": forwarded}
            if "failOnErrors" in body:
                request_body["failOnErrors"] = body["failOnErrors"]
            response = await self.home.request("POST", "/Bulk", body=request_body)
            if response.status != 200 or not isinstance(response.body, dict):
                raise self._home_error(call, response, {v: k for k, v in resolved.items()})
            answers = [a for a in response.body.get("Operations", []) if isinstance(a, dict)]
        write_only = bulk_write_only(
            forwarded, answers, schema.endpoints, self.home.base_url, schema.write_only
        )
        return await self._bulk_response(call, planned, results, answers, resolved, write_only)

    async def _bulk_response(
        self,
        call: _Call,
        planned: list[tuple[dict[str, Any], str, str | None, Any]],
        results: list[dict[str, Any] | None],
        answers: list[dict[str, Any]],
        resolved: dict[str, str],
        write_only: dict[str, dict[str, Any]],
    ) -> web.Response:
        schema = await self.home.schema()
        located: dict[str, str | None] = {}
        for answer in answers:
            parsed = schema.endpoints.parse_uri(str(answer.get("location", "")), self.home.base_url)
            if parsed is not None:
                located[parsed[1]] = parsed[0]
        found = await self.store.translate_outbound(call.domain.id, located, mint=call.domain.mints)
        call.internal_ids.update(located)
        call.allowed.update(o.external_id for o in found.values())
        replacements = {v: k for k, v in resolved.items()} | {
            i: o.external_id for i, o in found.items()
        }
        pending = iter(answers)
        out: list[dict[str, Any]] = []
        external_ids: dict[str, str | None] = {}
        for (op, _rtype, _path_id, content), local in zip(planned, results, strict=True):
            if local is not None:
                out.append(local)
                continue
            reply = next(pending, None)
            if reply is None:
                out.append(
                    _bulk_result(
                        op, 500, error_document(500, "home gave no result for this operation")
                    )
                )
                continue
            result: dict[str, Any] = {
                k: reply[k] for k in ("method", "bulkId", "version", "status") if k in reply
            }
            parsed = schema.endpoints.parse_uri(str(reply.get("location", "")), self.home.base_url)
            succeeded = str(reply.get("status", "")).startswith("2")
            if parsed is not None and parsed[1] in found:
                result["location"] = schema.endpoints.uri(
                    self.base, parsed[0], found[parsed[1]].external_id
                )
                if isinstance(content, _Incoming) and content.external_id is not None and succeeded:
                    external_ids[parsed[1]] = content.external_id[0]
            if isinstance(reply.get("response"), dict):
                response = reply["response"]
                detail = scrub(str(response.get("detail", "")), replacements, self.id_pattern)
                result["response"] = error_document(
                    int(response.get("status", reply.get("status", 500))),
                    detail,
                    response.get("scimType"),
                )
            out.append(result)
        written, deleted, verbs = bulk_writes(answers, schema.endpoints, self.home.base_url)
        documents = (
            await self.home.read_back(written)
            if written and await self.store.events_subscribed()
            else {}
        )
        if written or deleted:
            await self.store.record_write(
                written,
                origin=call.domain.id,
                deleted=deleted,
                external_ids=external_ids,
                write_only=write_only,
                verb=verbs,
                documents=documents,
            )
        return await self._respond(call, 200, {"schemas": [BULK_RESPONSE], "Operations": out})


def _bulk_operations(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, dict) or BULK_REQUEST not in (body.get("schemas") or []):
        raise InvalidValueError(
            f'a bulk request is a JSON object listing "{BULK_REQUEST}" in schemas'
        )
    ops = body.get("Operations")
    if not isinstance(ops, list) or not ops:
        raise InvalidValueError("a bulk request needs a non-empty Operations list")
    if len(ops) > MAX_BULK_OPERATIONS:
        raise BrokerError(f"at most {MAX_BULK_OPERATIONS} operations per bulk request", status=413)
    checked = []
    for n, op in enumerate(ops, start=1):
        if not isinstance(op, dict) or str(op.get("method", "")).upper() not in (
            "POST",
            "PUT",
            "PATCH",
            "DELETE",
        ):
            raise InvalidValueError(
                f"bulk operation {n}: method must be POST, PUT, PATCH or DELETE"
            )
        if op.get("method", "").upper() == "POST" and not isinstance(op.get("bulkId"), str):
            raise InvalidValueError(
                f"bulk operation {n}: a POST needs a bulkId (RFC 7644 section 3.7)"
            )
        checked.append({**op, "method": op["method"].upper()})
    return checked


def _bulk_path(op: Mapping[str, Any], endpoints: Endpoints, n: int) -> tuple[str, str | None]:
    path = op.get("path")
    if not isinstance(path, str):
        raise InvalidValueError(
            f"bulk operation {n}: path must be a string such as /Users or /Users/ID"
        )
    parts = path.strip("/").split("/")
    resource_type = endpoints.type_of(parts[0]) if parts and parts[0] else None
    if resource_type is None or len(parts) > 2:
        raise InvalidValueError(
            f"bulk operation {n}: {path!r} is not a resource endpoint path", scim_type="invalidPath"
        )
    path_id = parts[1] if len(parts) == 2 else None
    if (op["method"] == "POST") != (path_id is None):
        raise InvalidValueError(
            f"bulk operation {n}: POST goes to /Endpoint, the others to /Endpoint/ID",
            scim_type="invalidPath",
        )
    return resource_type, path_id


def _bulk_result(op: Mapping[str, Any], status: int, response: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"method": op["method"], "status": str(status), "response": response}
    if "bulkId" in op:
        result["bulkId"] = op["bulkId"]
    return result


def _scope(call: _Call, resource_type: str | None) -> str | None:
    """The caller's scope filter where it applies: a scope bounds which users a domain sees."""
    return call.domain.scope_filter if resource_type == "User" else None


def _pick(source: Mapping[str, str], names: Iterable[str]) -> dict[str, Any]:
    return {name: source[name] for name in names if name in source}


def _etag(resource: Mapping[str, Any]) -> dict[str, str]:
    version = (
        resource.get("meta", {}).get("version") if isinstance(resource.get("meta"), dict) else None
    )
    return {"ETag": version} if isinstance(version, str) else {}


def _headers(response: HomeResponse, resource: Mapping[str, Any]) -> dict[str, str]:
    """ETag, and Location where home sent one: the resource's location on the broker."""
    headers = _etag_header(response)
    meta = resource.get("meta")
    location = meta.get("location") if isinstance(meta, dict) else None
    if isinstance(location, str) and "Location" in response.headers:
        headers["Location"] = location
    return headers


def _etag_header(response: HomeResponse) -> dict[str, str]:
    return {"ETag": response.headers["ETag"]} if "ETag" in response.headers else {}


def _if_match(request: web.Request) -> dict[str, str]:
    return {"If-Match": request.headers["If-Match"]} if "If-Match" in request.headers else {}


def _syntax(detail: str) -> BrokerError:
    return InvalidValueError(detail, scim_type="invalidSyntax")


def _mutability(detail: str) -> BrokerError:
    return InvalidValueError(detail, scim_type="mutability")
