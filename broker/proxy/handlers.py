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
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from broker.domains import Domain, DomainStore
from broker.errors import BrokerError, InvalidValueError, NotFoundError
from broker.home import HomeClient, HomeRefused, HomeSchema
from broker.http import SCIM_JSON, Answer
from broker.logs import correlation_id
from broker.mapping.guard import LeakGuard
from broker.mapping.store import MappingStore
from broker.propagation.journal import Journal
from broker.responses import (
    SCIM_PREFIX,
    UnsupportedMediaType,
    error_document,
    error_response,
)
from broker.scim.attributes import ResourceSchema
from broker.scim.canonical import (
    CanonicalResource,
    canonical_resource,
    check_text,
    parse_body,
    path_segments,
)
from broker.scim.filters import FilterIds
from broker.scim.guard import IdShape, scrub
from broker.scim.knownpage import KnownPrefix, translate_known
from broker.scim.outbound import translate_page
from broker.scim.policy import (
    DomainPolicy,
    check_write,
)
from broker.scim.rewrite import IdVisitor, Translation, collect_ids, rewrite_document
from broker.scim.versions import (
    PreconditionFailedError,
    VersionSealer,
    home_condition,
    present_etag,
    present_meta,
)
from broker.tokens import TokenStore

__all__ = ["Proxy", "route_guard", "route_refusal"]

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


def route_refusal(request: web.BaseRequest) -> web.Response | None:
    """Step 1: the SCIM error for a path under /scim/v2 that smuggles a path or a query (it
    never reaches a handler); None for any other request."""
    if request.path.startswith(SCIM_PREFIX) or request.raw_path.startswith(SCIM_PREFIX):
        try:
            path_segments(request.raw_path)
        except BrokerError as exc:
            return error_response(exc.status, exc.detail, exc.scim_type)
    return None


@web.middleware
async def route_guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Step 1 as a middleware of its own (the broker's application runs :func:`route_refusal`
    inside its one middleware, ``broker.app``)."""
    refusal = route_refusal(request)
    return refusal if refusal is not None else await handler(request)


@dataclass(frozen=True)
class Target:
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
        self._held_translations: tuple[HomeSchema, Translation, Translation] | None = None

    def configure(
        self,
        *,
        store: MappingStore,
        domains: DomainStore,
        tokens: TokenStore,
        home: HomeClient,
        guard: LeakGuard,
        sealer: VersionSealer,
        journal: Journal,
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
        self.journal = journal
        self.audit = audit
        self.on_leak = on_leak

    # ------------------------------------------------------------------ plumbing

    def serve(
        self, scope: str, handler: Callable[[Proxy, Call, web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """A route's handler: authenticate, then serve; a refusal after authentication is a
        SCIM error that goes through the leak guard like any other answer."""

        async def serve(request: web.Request) -> web.Response:
            principal = await self.tokens.authenticate(request.headers.get("Authorization"))
            principal.require(scope)
            domain = await self.domains.cached(principal.domain_id, self.domain_cache_seconds)
            call = Call(domain, await self.home.schema())
            try:
                return await handler(self, call, request)
            except BrokerError as exc:
                body = error_document(exc.status, exc.detail, exc.scim_type)
                response = await self.respond(call, exc.status, body)
                if exc.status == 401:
                    response.headers["WWW-Authenticate"] = 'Bearer realm="scim-id-broker"'
                return response

        return serve

    def resource_type(self, call: Call, request: web.Request) -> str:
        endpoint = request.match_info["endpoint"]
        if endpoint.lower() in _DISCOVERY:
            raise BrokerError(f"{request.method} is not allowed on /{endpoint}", status=405)
        resource_type = call.schema.endpoints.type_of(endpoint)
        if resource_type is None:
            raise NotFoundError(f"no such endpoint /{endpoint}")
        return resource_type

    async def body(self, request: web.Request) -> Any:
        """Step 2's parse: strict UTF-8 JSON, bounded, no duplicate keys (see canonical.py)."""
        if request.content_type not in _ACCEPTED_TYPES:
            raise UnsupportedMediaType(
                f"send the body as application/scim+json (got {request.content_type or 'no Content-Type'})"
            )
        return parse_body(await request.read())

    async def resolve(
        self, call: Call, ids: Iterable[str], values: Iterable[str] = ()
    ) -> tuple[dict[str, str], dict[str, list[str]]]:
        resolved, by_value = await self.store.resolve_request(call.domain.id, ids, values)
        call.internal_ids.update(resolved.values())
        for internals in by_value.values():
            call.internal_ids.update(internals)
        return resolved, by_value

    async def target(
        self,
        call: Call,
        request: web.Request,
        extra: FilterIds | None = None,
        *,
        check_scope: bool = True,
    ) -> Target:
        """The path's resource: 404 without asking home if the caller has no such ID, and 404 if
        it is out of the caller's scope."""
        resource_type = self.resource_type(call, request)
        external = check_text(request.match_info["id"], "the path")
        ids = [external, *(extra.ids if extra else ())]
        resolved, by_value = await self.resolve(call, ids, extra.external_ids if extra else ())
        if external not in resolved:
            raise NotFoundError(NOT_FOUND)
        internal = resolved[external]
        endpoint = f"{call.schema.endpoints.by_type[resource_type]}/{internal}"
        target = Target(resource_type, internal, endpoint, resolved, by_value)
        if check_scope and call.scope(resource_type):
            await self.fetch(call, target, {"attributes": "id"})
        return target

    async def visible(
        self, call: Call, resource: dict[str, Any], resource_type: str, *, owned: bool = False
    ) -> dict[str, Any]:
        """One home resource as the caller sees it (404 if it cannot see it); ``owned``: see
        :meth:`outbound`."""
        (out,) = await self.outbound(call, [resource], resource_type, owned=owned)
        if out is None:
            raise NotFoundError(NOT_FOUND)
        return out

    async def outbound(
        self,
        call: Call,
        docs: list[dict[str, Any]],
        resource_type: str | None,
        *,
        owned: bool = False,
    ) -> list[dict[str, Any] | None]:
        """Home's resources as the caller sees them (None: invisible to it), one round-trip.

        ``owned``: ``docs`` were parsed for this call and nothing reads them after: they are
        rewritten in place (issue 15) instead of copied."""
        outward = self.outward(call.schema)
        known = self.known_prefix(call, docs, outward, resource_type) if owned else None
        shown: list[dict[str, Any] | None] = []
        if known is not None:
            call.internal_ids.update(known.wanted)
            shown = (
                list(docs[: known.count])  # sealed on the way unless the domain is unlinkable
                if not call.domain.unlinkable
                else self.present(call, docs[: known.count], known.internal_ids, owned=True)
            )
            if known.count == len(docs):
                return shown
        rest = docs[known.count :] if known is not None else docs
        page = translate_page(rest, outward, resource_type=resource_type)
        wanted = page.wanted
        if known is not None:
            for internal, rtype in known.wanted.items():  # the first type the page tells
                if rtype is not None and internal in wanted:
                    wanted[internal] = rtype
        call.internal_ids.update(wanted)
        if call.policy.scope:
            also = known.internal_ids if known is not None else ()
            wanted = await self.in_scope(call, wanted, rest, resource_type, also_own=also)
        found = await self.store.translate_outbound(call.domain.id, wanted, mint=call.domain.mints)
        if not call.domain.mints and len(found) < len(wanted):
            # A push peer reads something naming entities it has no account of: split-offs held
            # back until needed are provisioned there now (they show up once created).
            await self.store.provision_on_need(
                call.domain.id, [i for i in wanted if i not in found]
            )
        internal_ids = [str(d["id"]) for d in rest]  # before a rewrite in place
        out = page.render(found, in_place=owned)
        return shown + self.present(call, out, internal_ids, owned=owned)

    def known_prefix(
        self,
        call: Call,
        docs: list[dict[str, Any]],
        outward: Translation,
        resource_type: str | None,
    ) -> KnownPrefix | None:
        """The page path with the mapping cache's answers (issue 15): the documents, from the
        first, whose every ID the cache knows, rewritten in one walk with no round-trip; None
        when the cache is off. Their versions are sealed on the way unless the domain is
        unlinkable. For a domain with a scope, a document naming a user other than the page's
        own goes the general way (home says whether that user is in the scope)."""
        scope_own = None
        if call.policy.scope:
            scope_own = frozenset(
                d["id"] for d in docs if resource_type == "User" and isinstance(d.get("id"), str)
            )
        lookup = self.store.cache.outbound_of(call.domain.id)
        if lookup is None:
            return None
        return translate_known(
            docs,
            outward,
            lookup,
            resource_type=resource_type,
            seal=None if call.domain.unlinkable else self.sealer.sealing(call.domain.id),
            scope_own=scope_own,
        )

    def present(
        self,
        call: Call,
        out: Sequence[dict[str, Any] | None],
        internal_ids: list[str],
        *,
        owned: bool,
    ) -> list[dict[str, Any] | None]:
        """Versions sealed for this domain, timestamps coarsened for an unlinkable one
        (``owned``: the documents are this call's, changed in place)."""
        domain, sealer = call.domain, self.sealer
        return [
            None
            if o is None
            else present_meta(o, domain=domain, internal_id=i, sealer=sealer, in_place=owned)
            for o, i in zip(out, internal_ids, strict=True)
        ]

    def etag(self, call: Call, response: Answer, internal_id: str) -> dict[str, str]:
        """Home's ETag header as the caller sees it: sealed for it and this resource."""
        etag = present_etag(
            response.headers.get("ETag"),
            domain=call.domain.id,
            internal_id=internal_id,
            sealer=self.sealer,
        )
        return {"ETag": etag} if etag else {}

    def condition(
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

    def if_match(self, call: Call, request: web.Request, target: Target) -> dict[str, str]:
        """``If-Match`` for home; 412 without asking home if it names no version of ours."""
        condition = self.condition(call, request, "If-Match", target.internal_id)
        if condition is None:
            raise PreconditionFailedError()
        return condition

    def inward(self, schema: HomeSchema) -> Translation:
        """Rewriting from the caller's view (the broker's base) to home's."""
        return self._translations(schema)[0]

    def outward(self, schema: HomeSchema) -> Translation:
        """Rewriting from home's view to the caller's (the broker's base)."""
        return self._translations(schema)[1]

    def _translations(self, schema: HomeSchema) -> tuple[Translation, Translation]:
        """Both directions for ``schema``, made once per schema load (issue 15), not per
        request: a Translation is frozen."""
        held = self._held_translations
        if held is None or held[0] is not schema:
            inward = Translation(schema.refs, schema.endpoints, self.base, self.home.base_url)
            held = self._held_translations = (schema, inward, inward.reversed())
        return held[1], held[2]

    def readable(
        self, call: Call, doc: dict[str, Any], resource_type: str | None
    ) -> dict[str, Any]:
        if resource_type is None:
            meta = doc.get("meta")
            found = meta.get("resourceType") if isinstance(meta, dict) else None
            resource_type = found if isinstance(found, str) else None
        return call.policy.readable(doc, call.schema.attributes.get(resource_type))

    async def in_scope(
        self,
        call: Call,
        wanted: dict[str, str | None],
        docs: list[dict[str, Any]],
        resource_type: str | None,
        *,
        also_own: Iterable[str] = (),
    ) -> dict[str, str | None]:
        """``wanted`` less the users out of the caller's scope: they do not exist for it, not
        even as a member or a manager. One search at home (two if some IDs have no type).
        ``also_own``: home's IDs of the page's documents already rewritten (by the known walk)."""
        own = (
            {d["id"] for d in docs if isinstance(d.get("id"), str)} | set(also_own)
            if resource_type == "User"
            else set()
        )
        candidates = [i for i, t in wanted.items() if t in (None, "User") and i not in own]
        if not candidates:
            return wanted
        visible = await self.visible_ids(call, candidates, {i: wanted[i] for i in candidates})
        return {i: t for i, t in wanted.items() if i not in candidates or i in visible}

    async def visible_ids(
        self, call: Call, ids: list[str], types: Mapping[str, str | None]
    ) -> set[str]:
        """Which of ``ids`` (users, or of no known type) the caller can see: users within its
        scope, and groups."""
        users = await self.existing(call, "User", ids, call.scope("User"))
        untyped = [i for i in ids if types.get(i) is None and i not in users]
        others = await self.existing(call, "Group", untyped, None) if untyped else set()
        return users | others

    async def existing(
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
            raise self.home_error(call, exc.response, {}) from exc

    async def references_in_scope(
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
        visible = await self.visible_ids(call, list(internal), internal)
        for external, rtype in named.items():
            if (
                rtype in (None, "User")
                and external in resolved
                and resolved[external] not in visible
            ):
                raise InvalidValueError(f"{external!r} does not name a resource you can refer to")

    def canonical(self, call: Call, doc: Any, resource: ResourceSchema) -> CanonicalResource:
        """Step 2 and 3 for a resource a domain writes: canonical form, then the write list."""
        canonical = canonical_resource(doc, resource)
        check_write(call.policy, resource, canonical.written)
        return canonical

    async def inbound(
        self, call: Call, canonical: CanonicalResource, extra: Iterable[str] = ()
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Step 4 inbound: the resource for home, every reference translated (400 if one does
        not translate or names what the caller cannot see)."""
        inward = self.inward(call.schema)
        names = collect_ids(canonical.attrs, inward)
        resolved, _ = await self.resolve(call, [*names, *extra])
        await self.references_in_scope(call, names, resolved)
        translate: IdVisitor = lambda i, _t: resolved.get(i)  # noqa: E731
        return rewrite_document(canonical.attrs, inward, translate, strict=True), resolved

    async def respond(
        self, call: Call, status: int, body: Any, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        """Step 5: the response a domain gets, after the leak guard (errors too)."""
        raw = orjson.dumps(body) if body is not None else b""
        # The guard reads the very bytes the domain is sent.
        parts: list[tuple[str, str | bytes]] = [
            ("body", raw),
            *((f"header {k}", v) for k, v in (headers or {}).items()),
        ]
        # The IDs in play are those the translation asked about, never anything the request
        # held; the caller's own IDs are what it is meant to see.
        leak = await self.guard.check(parts, in_play=call.internal_ids)
        if leak is not None:
            correlation = correlation_id()
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
        sent = dict(headers) if headers else {}
        if body is not None:
            sent["Content-Type"] = SCIM_JSON  # as the content_type setter writes it, unparsed
        return web.Response(status=status, body=raw if body is not None else None, headers=sent)

    def home_error(self, call: Call, response: Answer, replacements: dict[str, str]) -> BrokerError:
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

    async def fetch(self, call: Call, target: Target, params: Mapping[str, str]) -> dict[str, Any]:
        """One home resource, as long as it is in the caller's scope (404 otherwise)."""
        scope = call.scope(target.resource_type)
        if scope:
            scoped = {**params, "filter": f"id eq {json.dumps(target.internal_id)} and ({scope})"}
            endpoint = call.schema.endpoints.by_type[target.resource_type]
            response = await self.home.request("GET", endpoint, params=scoped)
            if response.status != 200:
                raise self.home_error(call, response, target.replacements)
            resources = (
                response.body.get("Resources", []) if isinstance(response.body, dict) else []
            )
            if not resources:
                raise NotFoundError(NOT_FOUND)
            return dict(resources[0])
        response = await self.home.request("GET", target.endpoint, params=params)
        if response.status != 200 or not isinstance(response.body, dict):
            raise self.home_error(call, response, target.replacements)
        return response.body


def query_params(request: web.Request, names: Iterable[str]) -> dict[str, Any]:
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


def etag_of(resource: Mapping[str, Any]) -> dict[str, str]:
    """The ETag header of a resource as the caller sees it (its sealed ``meta.version``)."""
    version = (
        resource.get("meta", {}).get("version") if isinstance(resource.get("meta"), dict) else None
    )
    return {"ETag": version} if isinstance(version, str) else {}


def headers_of(resource: Mapping[str, Any]) -> dict[str, str]:
    """ETag and Location of a resource as the caller sees it (both in its terms)."""
    headers = etag_of(resource)
    meta = resource.get("meta")
    location = meta.get("location") if isinstance(meta, dict) else None
    if isinstance(location, str):
        headers["Location"] = location
    return headers


def syntax_error(detail: str) -> BrokerError:
    return InvalidValueError(detail, scim_type="invalidSyntax")
