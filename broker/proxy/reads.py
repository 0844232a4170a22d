"""Reads through the request path: GET by ID, lists and ``.search`` (RFC 7644 section 3.4).

Each function takes the :class:`~broker.proxy.handlers.Proxy` (the shell's parts) and the
:class:`~broker.proxy.handlers.Call` being served."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from broker.errors import ForbiddenError, InvalidValueError
from broker.home import SEARCH_SCHEMA
from broker.proxy.handlers import (
    GET_PARAMS,
    LIST_PARAMS,
    LIST_SCHEMA,
    etag_of,
    query_params,
    syntax_error,
)
from broker.scim.filters import FilterError, filter_ids, parse_filter, rewrite_filter
from broker.scim.policy import check_filter, check_sort

if TYPE_CHECKING:
    from broker.proxy.handlers import Call, Proxy


async def get(proxy: Proxy, call: Call, request: web.Request) -> web.Response:
    params = query_params(request, GET_PARAMS)
    target = await proxy.target(call, request, check_scope=False)
    condition = proxy.condition(call, request, "If-None-Match", target.internal_id)
    if condition and not call.scope(target.resource_type):
        # RFC 7644 section 3.14: home decides; a 304 carries no body, only the version.
        response = await proxy.home.request("GET", target.endpoint, headers=condition)
        if response.status == 304:
            etag = proxy.etag(call, response, target.internal_id)
            return await proxy.respond(call, 304, None, etag)
    resource = await proxy.fetch(call, target, params)
    out = await proxy.visible(call, resource, target.resource_type, owned=True)
    readable = proxy.readable(call, out, target.resource_type)
    return await proxy.respond(call, 200, readable, etag_of(out))


async def list_resources(proxy: Proxy, call: Call, request: web.Request) -> web.Response:
    resource_type = proxy.resource_type(call, request)
    return await _search_home(
        proxy, call, resource_type, query_params(request, LIST_PARAMS), post=False
    )


async def search(proxy: Proxy, call: Call, request: web.Request) -> web.Response:
    resource_type = proxy.resource_type(call, request) if "endpoint" in request.match_info else None
    body = await proxy.body(request)
    if not isinstance(body, dict):
        raise syntax_error("a search body is a JSON object (RFC 7644 section 3.4.3)")
    by_lower = {p.lower(): p for p in (*LIST_PARAMS, "schemas")}
    params: dict[str, Any] = {}
    for key, value in body.items():
        name = by_lower.get(key.lower())
        if name is None:
            raise syntax_error(
                f"a search request has no parameter {key!r} (RFC 7644 section 3.4.3)"
            )
        if name in params:
            raise syntax_error(f"{name} is given twice")
        params[name] = value
    params.pop("schemas", None)
    return await _search_home(proxy, call, resource_type, params, post=True)


async def _search_home(
    proxy: Proxy, call: Call, resource_type: str | None, params: dict[str, Any], *, post: bool
) -> web.Response:
    """A list or search at home, held to the caller's policy, answered in its terms."""
    schema = call.schema
    home_filter = await _home_filter(proxy, call, resource_type, params)
    if home_filter is not None:
        params["filter"] = home_filter
    if post:
        path = (schema.endpoints.by_type[resource_type] if resource_type else "") + "/.search"
        response = await proxy.home.request(
            "POST", path, body={"schemas": [SEARCH_SCHEMA], **params}
        )
    else:
        path = schema.endpoints.by_type[resource_type] if resource_type else "/"
        response = await proxy.home.request(
            "GET", path, params={k: str(v) for k, v in params.items()}
        )
    if response.status != 200 or not isinstance(response.body, dict):
        raise proxy.home_error(call, response, {})
    resources = [r for r in response.body.get("Resources", []) if isinstance(r, dict)]
    # Home's page was parsed for this request and nothing reads it after: rewritten in place.
    translated = await proxy.outbound(call, resources, resource_type, owned=True)
    if call.policy.read is None:  # every attribute readable: nothing to decide per document
        visible = [r for r in translated if r is not None]
    else:
        visible = [proxy.readable(call, r, resource_type) for r in translated if r is not None]
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
    return await proxy.respond(call, 200, body)


async def _home_filter(
    proxy: Proxy, call: Call, resource_type: str | None, params: Mapping[str, Any]
) -> str | None:
    """The filter home gets: the caller's (checked against its read list, its IDs translated)
    ANDed with its scope; None if neither."""
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
        named = filter_ids(ast, proxy.inward(schema))
        resolved, by_value = await proxy.resolve(call, named.ids, named.external_ids)
        rewritten = rewrite_filter(ast, proxy.inward(schema), ids=resolved, external_ids=by_value)
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
    if not parts:
        return None
    return " and ".join(f"({p})" for p in parts) if len(parts) > 1 else parts[0]
