"""Writes through the request path: POST, PUT, PATCH and DELETE (RFC 7644 sections 3.3 to 3.6).

The canonical request and the policy decide (``broker.scim``); these functions ask home and the
store and answer."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from broker.errors import ForbiddenError
from broker.propagation.writes import HomeWrite
from broker.proxy.handlers import GET_PARAMS, Target, etag_of, headers_of, query_params
from broker.scim.attributes import AttrRef
from broker.scim.canonical import canonical_patch
from broker.scim.filters import FilterError, parse_filter
from broker.scim.patch import PatchRequest, parse_patch
from broker.scim.policy import (
    check_create_scope,
    check_write,
    keep_hidden_in_document,
    keep_hidden_members,
    members_by_value,
    put_as_patch,
)
from broker.scim.writeonly import write_only_values

if TYPE_CHECKING:
    from broker.proxy.handlers import Call, Proxy


async def create(proxy: Proxy, call: Call, request: web.Request) -> web.Response:
    resource_type = proxy.resource_type(call, request)
    if call.domain.push:
        raise ForbiddenError(
            f"domain {call.domain.id} is a push domain: the broker provisions into it and its IDs "
            "are the ones it assigns; create the resource in home instead"
        )
    resource = call.schema.resource(resource_type)
    sent = await proxy.body(request)
    canonical = proxy.canonical(call, sent, resource)
    scope = call.scope(resource_type)
    check_create_scope(
        call.policy, parse_filter(scope) if scope else None, canonical.attrs, resource
    )
    doc, _ = await proxy.inbound(call, canonical)
    response = await proxy.home.request(
        "POST", call.schema.endpoints.by_type[resource_type], body=doc
    )
    if (
        response.status != 201
        or not isinstance(response.body, dict)
        or not isinstance(response.body.get("id"), str)
    ):
        raise proxy.home_error(call, response, {})
    out = await proxy.visible(call, response.body, resource_type)  # records and mints
    internal = response.body["id"]
    external_id = canonical.external_id
    await proxy.journal.record(
        HomeWrite.of_resource(
            internal,
            resource_type,
            verb="create",
            origin=call.domain.id,
            document=response.body,
            write_only=write_only_values("POST", canonical.attrs, call.schema.write_only),
            external_id=canonical.external_id,
        )
    )
    if external_id is not None and external_id[0] is not None:
        out["externalId"] = external_id[0]
    readable = proxy.readable(call, out, resource_type)
    headers = etag_of(out)
    headers["Location"] = call.schema.endpoints.uri(proxy.base, resource_type, out["id"])
    return await proxy.respond(call, 201, readable, headers)


async def replace(proxy: Proxy, call: Call, request: web.Request) -> web.Response:
    resource_type = proxy.resource_type(call, request)
    resource = call.schema.resource(resource_type)
    canonical = proxy.canonical(call, await proxy.body(request), resource)
    if call.policy.write is not None:
        # A PUT replaces every attribute: one that may write only some changes those only,
        # as the PATCH they amount to (the others, a password included, stay as they are).
        # One read of home: fetch holds the resource to the caller's scope (404 outside it).
        target = await proxy.target(call, request, check_scope=False)
        current = await proxy.fetch(call, target, {})
        patch = put_as_patch(canonical, call.policy, resource, current)
        return await _patch_flow(proxy, call, request, patch, canonical.external_id, target)
    target = await proxy.target(call, request)
    doc, _ = await proxy.inbound(call, canonical)
    if call.policy.scope and target.resource_type == "Group":
        members, hidden = await _hidden_members(proxy, call, target)
        doc = keep_hidden_in_document(doc, members, hidden)
    response = await proxy.home.request(
        "PUT", target.endpoint, body=doc, headers=proxy.if_match(call, request, target)
    )
    if response.status != 200 or not isinstance(response.body, dict):
        raise proxy.home_error(call, response, target.replacements)
    write_only = write_only_values("PUT", canonical.attrs, call.schema.write_only)
    await _record(proxy, call, target, canonical.external_id, write_only, "put", response.body)
    out = await proxy.visible(call, response.body, target.resource_type)
    readable = proxy.readable(call, out, target.resource_type)
    return await proxy.respond(call, 200, readable, headers_of(out))


async def patch(proxy: Proxy, call: Call, request: web.Request) -> web.Response:
    resource_type = proxy.resource_type(call, request)
    resource = call.schema.resource(resource_type)
    canonical = canonical_patch(await proxy.body(request), resource)
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
    return await _patch_flow(proxy, call, request, parse_patch(canonical.body), None)


async def _patch_flow(
    proxy: Proxy,
    call: Call,
    request: web.Request,
    patch: PatchRequest,
    external_id: tuple[str | None] | None,
    found: Target | None = None,
) -> web.Response:
    """A PATCH (or a PUT as the PATCH it amounts to, whose resource ``found`` is already resolved
    and held to the scope: then only the IDs its values name are resolved)."""
    schema = call.schema
    inward = proxy.inward(schema)
    named = patch.ids(inward)
    if found is None:
        target = await proxy.target(call, request, named)
    else:
        resolved, by_value = await proxy.resolve(call, named.ids, named.external_ids)
        target = dataclasses.replace(
            found,
            resolved={**found.resolved, **resolved},
            by_value={**found.by_value, **by_value},
        )
    await proxy.references_in_scope(call, named.ids, target.resolved)
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
            current, hidden = await _hidden_members(proxy, call, target)
            body["Operations"] = keep_hidden_members(body["Operations"], current, hidden)
        response = await proxy.home.request(
            "PATCH",
            target.endpoint,
            params=query_params(request, GET_PARAMS),
            body=body,
            headers=proxy.if_match(call, request, target),
        )
        if response.status not in (200, 204):
            raise proxy.home_error(call, response, target.replacements)
        status = response.status
        resource = response.body if isinstance(response.body, dict) else None
        if resource is None and await proxy.store.events_subscribed():
            # Home answered 204: its resource after the change tells the SETs what changed.
            resource = await proxy.fetch(call, target, {})
        write_only = write_only_values("PATCH", body, schema.write_only)
    else:
        write_only = {}
    if patch.operations or external_id is not None:
        await _record(proxy, call, target, external_id, write_only, "patch", resource)
    # A PUT always answers with the resource (RFC 7644 section 3.5.1), even when home's PATCH
    # answered 204.
    if patch.operations and status == 204 and external_id is None and found is None:
        etag = proxy.etag(call, response, target.internal_id)
        return await proxy.respond(call, 204, None, etag)
    if resource is None:
        resource = await proxy.fetch(call, target, {})
    out = await proxy.visible(call, resource, target.resource_type)
    readable = proxy.readable(call, out, target.resource_type)
    return await proxy.respond(call, 200, readable, etag_of(out))


async def _hidden_members(proxy: Proxy, call: Call, target: Target) -> tuple[list[str], set[str]]:
    """A group's members at home now, and those of them the caller cannot see."""
    group = await proxy.fetch(call, target, {"attributes": "members"})
    current: list[str] = []
    types: dict[str, str | None] = {}
    for member in group.get("members") or []:
        value = member.get("value") if isinstance(member, dict) else None
        if isinstance(value, str):
            current.append(value)
            kind = member.get("type")
            types[value] = kind if isinstance(kind, str) and kind in ("User", "Group") else None
    users = [i for i in current if types[i] in (None, "User")]
    visible = await proxy.visible_ids(call, users, types) if users else set()
    return current, {i for i in users if i not in visible}


async def delete(proxy: Proxy, call: Call, request: web.Request) -> web.Response:
    target = await proxy.target(call, request)
    response = await proxy.home.request(
        "DELETE", target.endpoint, headers=proxy.if_match(call, request, target)
    )
    if response.status != 204:
        raise proxy.home_error(call, response, target.replacements)
    await proxy.journal.record(HomeWrite.of_deletion([target.internal_id], origin=call.domain.id))
    return await proxy.respond(call, 204, None)


async def _record(
    proxy: Proxy,
    call: Call,
    target: Target,
    external_id: tuple[str | None] | None,
    write_only: Mapping[str, Any],
    verb: str,
    document: dict[str, Any] | None,
) -> None:
    """A change the caller made to an existing resource (home's resource after it, if
    known): its externalId, and the syncs and SETs the change implies, with the write-only
    values it set, in one transaction."""
    await proxy.journal.record(
        HomeWrite.of_resource(
            target.internal_id,
            target.resource_type,
            verb=verb,
            origin=call.domain.id,
            document=document,
            write_only=write_only,
            external_id=external_id,
        )
    )
