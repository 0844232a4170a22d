"""Bulk (RFC 7644 section 3.7) through the broker: every operation takes the request path.

Each operation is brought to canonical form and held to the domain's policy (write list, scope,
references) exactly as the same request on its own would be; an operation the broker refuses
gets its error in the response and never reaches home. ``bulkId:`` references are kept for home
to resolve. One inbound and one outbound round-trip to the database for the whole request.
``failOnErrors`` counts the broker's own refusals too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from aiohttp import web

from broker.errors import BrokerError, ForbiddenError, InvalidValueError
from broker.propagation.writes import HomeWrite
from broker.responses import error_document
from broker.scim.attributes import AttrRef
from broker.scim.canonical import (
    CanonicalResource,
    canonical_keys,
    canonical_patch,
    canonical_resource,
)
from broker.scim.filters import FilterError, parse_filter
from broker.scim.guard import scrub
from broker.scim.patch import PatchRequest, parse_patch
from broker.scim.policy import check_create_scope, check_write
from broker.scim.rewrite import Endpoints, collect_ids, rewrite_document
from broker.scim.versions import PreconditionFailedError, home_condition, present_etag

if TYPE_CHECKING:
    from broker.proxy.handlers import Call, Proxy

__all__ = ["MAX_BULK_OPERATIONS", "serve_bulk"]

BULK_REQUEST = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
BULK_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:BulkResponse"
MAX_BULK_OPERATIONS = 1000
NOT_FOUND = "resource not found"
_OP_KEYS = ("method", "bulkId", "version", "path", "data")


@dataclass
class _Op:
    """One operation, checked: its method, resource type, the ID its path names (a bulkId
    reference, the caller's external ID, or None for POST) and its canonical content."""

    raw: dict[str, Any]
    method: str
    resource_type: str
    path_id: str | None
    content: CanonicalResource | PatchRequest | None
    error: BrokerError | None = None
    names: Mapping[str, str | None] | None = None


def _operations(body: Any) -> tuple[list[dict[str, Any]], int | None]:
    if not isinstance(body, dict):
        raise InvalidValueError(
            f'a bulk request is a JSON object listing "{BULK_REQUEST}" in schemas'
        )
    top = canonical_keys(body, ("schemas", "Operations", "failOnErrors"), "the bulk request")
    if BULK_REQUEST not in (top.get("schemas") or []):
        raise InvalidValueError(
            f'a bulk request is a JSON object listing "{BULK_REQUEST}" in schemas'
        )
    ops = top.get("Operations")
    if not isinstance(ops, list) or not ops:
        raise InvalidValueError("a bulk request needs a non-empty Operations list")
    if len(ops) > MAX_BULK_OPERATIONS:
        raise BrokerError(f"at most {MAX_BULK_OPERATIONS} operations per bulk request", status=413)
    fail_on = top.get("failOnErrors")
    if fail_on is not None and (
        not isinstance(fail_on, int) or isinstance(fail_on, bool) or fail_on < 1
    ):
        raise InvalidValueError("failOnErrors is a positive integer (RFC 7644 section 3.7)")
    checked = []
    for n, op in enumerate(ops, start=1):
        if not isinstance(op, dict):
            raise InvalidValueError(f"bulk operation {n} is not a JSON object")
        fields = canonical_keys(op, _OP_KEYS, f"bulk operation {n}")
        method = fields.get("method")
        if not isinstance(method, str) or method.upper() not in ("POST", "PUT", "PATCH", "DELETE"):
            raise InvalidValueError(
                f"bulk operation {n}: method must be POST, PUT, PATCH or DELETE"
            )
        fields["method"] = method.upper()
        if fields["method"] == "POST" and not isinstance(fields.get("bulkId"), str):
            raise InvalidValueError(
                f"bulk operation {n}: a POST needs a bulkId (RFC 7644 section 3.7)"
            )
        checked.append(fields)
    return checked, fail_on


def _path(op: Mapping[str, Any], endpoints: Endpoints, n: int) -> tuple[str, str | None]:
    path = op.get("path")
    if not isinstance(path, str):
        raise InvalidValueError(
            f"bulk operation {n}: path must be a string such as /Users or /Users/ID"
        )
    parts = path.strip("/").split("/")
    smuggled = any(c in path for c in "?#%\\") or any(p in (".", "..") for p in parts)
    if smuggled or any(ord(c) < 0x20 for c in path):
        raise InvalidValueError(
            f"bulk operation {n}: {path!r} is not a plain resource path", scim_type="invalidPath"
        )
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


def _result(op: Mapping[str, Any], status: int, response: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"method": op["method"], "status": str(status), "response": response}
    if "bulkId" in op:
        result["bulkId"] = op["bulkId"]
    return result


def _refused(op: _Op) -> dict[str, Any]:
    assert op.error is not None
    exc = op.error
    return _result(op.raw, exc.status, error_document(exc.status, exc.detail, exc.scim_type))


def _check(proxy: Proxy, call: Call, op: _Op) -> None:
    """Steps 2 and 3 for one operation (pure but for the schema): canonical content, policy."""
    policy = call.policy
    resource = call.schema.resource(op.resource_type)
    data = op.raw.get("data")
    if op.method in ("POST", "PUT"):
        canonical = canonical_resource(data, resource, "data")
        check_write(policy, resource, canonical.written)
        if op.method == "POST":
            scope = call.scope(op.resource_type)
            check_create_scope(
                policy, parse_filter(scope) if scope else None, canonical.attrs, resource
            )
        elif policy.write is not None:
            raise InvalidValueError(
                f"domain {policy.domain} may write only some attributes: change them with PATCH, "
                "since a PUT would replace the others",
                scim_type="mutability",
            )
        op.content = canonical
        op.names = collect_ids(canonical.attrs, proxy.inward(call.schema))
    elif op.method == "PATCH":
        canonical_ops = canonical_patch(data, resource)
        check_write(policy, resource, canonical_ops.written)
        for ref in canonical_ops.filtered:
            if not policy.may_read(ref, resource):
                raise FilterError(
                    f"domain {policy.domain} may not read {ref}, so it cannot select its values"
                )
        if policy.scope and op.resource_type == "Group":
            for target, raw in zip(
                canonical_ops.targets, canonical_ops.body["Operations"], strict=True
            ):
                touches = target is not None and target.ref == AttrRef(None, "members")
                whole = (
                    target is None
                    and isinstance(raw.get("value"), dict)
                    and "members" in raw["value"]
                )
                if (touches or whole) and raw["op"] != "add":
                    raise ForbiddenError(
                        f"domain {policy.domain} sees a scope of users: change a group's members "
                        "with PATCH /Groups/{id} (which keeps the members you cannot see), "
                        "or add members in Bulk"
                    )
        patch = parse_patch(canonical_ops.body)
        op.content = patch
        named = patch.ids(proxy.inward(call.schema))
        op.names = named.ids


async def serve_bulk(proxy: Proxy, call: Call, request: web.Request) -> web.Response:
    """RFC 7644 section 3.7 through the request path (see the module doc)."""
    raw_ops, fail_on = _operations(await proxy.body(request))
    if call.domain.push and any(op["method"] == "POST" for op in raw_ops):
        raise ForbiddenError(
            f"domain {call.domain.id} is a push domain: it cannot create through the broker"
        )
    refs = _BulkIds(frozenset(op["bulkId"] for op in raw_ops if isinstance(op.get("bulkId"), str)))
    ops = [_read(proxy, call, raw, n) for n, raw in enumerate(raw_ops, start=1)]
    resolved, by_value = await _resolve_all(proxy, call, ops, refs)
    await _hold_to_scope(proxy, call, ops, resolved)
    forwarded: list[dict[str, Any]] = []
    results: list[dict[str, Any] | None] = []  # None: filled from home's answer, in order
    errors = 0
    for op in ops:
        if fail_on is not None and errors >= fail_on:
            break  # RFC 7644 section 3.7.3: the rest are not performed
        home_op = _for_home(proxy, call, op, refs, resolved, by_value)
        if home_op is None:
            errors += 1
            results.append(_refused(op))
        else:
            forwarded.append(home_op)
            results.append(None)
    answers = await _forward(proxy, call, forwarded, fail_on, errors, resolved)
    write = HomeWrite.of_bulk(
        forwarded,
        answers,
        endpoints=call.schema.endpoints,
        home_base=proxy.home.base_url,
        write_only_names=call.schema.write_only,
        origin=call.domain.id,
    )
    return await _respond(proxy, call, ops[: len(results)], results, answers, resolved, write)


@dataclass(frozen=True)
class _BulkIds:
    """The request's bulkIds: ``bulkId:X`` references are home's to resolve, not the caller's
    IDs."""

    ids: frozenset[str]

    def names(self, value: str) -> bool:
        return value.startswith("bulkId:") and value[len("bulkId:") :] in self.ids


def _read(proxy: Proxy, call: Call, raw: dict[str, Any], n: int) -> _Op:
    """One operation in canonical form and held to the policy; a refusal is kept on it."""
    resource_type, path_id = _path(raw, call.schema.endpoints, n)
    op = _Op(raw, raw["method"], resource_type, path_id, None)
    try:
        _check(proxy, call, op)
    except BrokerError as exc:
        op.error = exc
    return op


async def _resolve_all(
    proxy: Proxy, call: Call, ops: list[_Op], refs: _BulkIds
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Every ID every operation names, resolved at once."""
    names: set[str] = set()
    values: set[str] = set()
    for op in ops:
        if op.error is not None:
            continue
        if op.path_id is not None and not refs.names(op.path_id):
            names.add(op.path_id)
        names.update(i for i in (op.names or {}) if not refs.names(i))
        if isinstance(op.content, PatchRequest):
            values.update(op.content.ids(proxy.inward(call.schema)).external_ids)
    return await proxy.resolve(call, names, values)


def _for_home(
    proxy: Proxy,
    call: Call,
    op: _Op,
    refs: _BulkIds,
    resolved: Mapping[str, str],
    by_value: Mapping[str, list[str]],
) -> dict[str, Any] | None:
    """The operation as home receives it, or None (with ``op.error`` set) if it is refused."""
    internal = None
    if op.error is None and op.path_id is not None:
        internal = op.path_id if refs.names(op.path_id) else resolved.get(op.path_id)
        if internal is None:
            op.error = BrokerError(NOT_FOUND, status=404)
    if op.error is not None:
        return None
    endpoint = call.schema.endpoints.by_type[op.resource_type]
    home_op: dict[str, Any] = {
        "method": op.method,
        "path": endpoint + (f"/{internal}" if internal else ""),
    }
    if "bulkId" in op.raw:
        home_op["bulkId"] = op.raw["bulkId"]
    if "version" in op.raw and internal is not None:
        # The caller's version is sealed for it: opened back into home's, or 412.
        version = op.raw["version"]
        opened = (
            home_condition(
                version, domain=call.domain.id, internal_id=internal, sealer=proxy.sealer
            )
            if isinstance(version, str)
            else None
        )
        if opened is None:
            op.error = PreconditionFailedError()
            return None
        home_op["version"] = opened

    def translate(value: str, _rtype: str | None) -> str | None:
        return value if refs.names(value) else resolved.get(value)

    inward = proxy.inward(call.schema)
    try:
        if isinstance(op.content, CanonicalResource):
            home_op["data"] = rewrite_document(op.content.attrs, inward, translate, strict=True)
        elif isinstance(op.content, PatchRequest):
            home_op["data"] = op.content.rewrite(
                inward, translate=translate, ids=resolved, external_ids=by_value
            )
    except BrokerError as exc:
        op.error = exc
        return None
    return home_op


async def _forward(
    proxy: Proxy,
    call: Call,
    forwarded: list[dict[str, Any]],
    fail_on: int | None,
    errors: int,
    resolved: Mapping[str, str],
) -> list[dict[str, Any]]:
    """Home's answers to the operations the broker let through (none sent: no answers)."""
    if not forwarded:
        return []
    request_body: dict[str, Any] = {"schemas": [BULK_REQUEST], "Operations": forwarded}
    if fail_on is not None:
        request_body["failOnErrors"] = max(1, fail_on - errors)
    response = await proxy.home.request("POST", "/Bulk", body=request_body)
    if response.status != 200 or not isinstance(response.body, dict):
        raise proxy.home_error(call, response, {v: k for k, v in resolved.items()})
    return [a for a in response.body.get("Operations", []) if isinstance(a, dict)]


async def _hold_to_scope(
    proxy: Proxy, call: Call, ops: list[_Op], resolved: Mapping[str, str]
) -> None:
    """Scope for every operation at once: a user out of the caller's scope is 404 as a target
    and 400 as a reference, exactly as an unknown ID (one search at home)."""
    if not call.policy.scope:
        return
    targets = {
        resolved[op.path_id]
        for op in ops
        if op.error is None
        and op.path_id is not None
        and op.path_id in resolved
        and op.resource_type == "User"
    }
    referenced = {
        resolved[i]: t
        for op in ops
        if op.error is None and op.names
        for i, t in op.names.items()
        if i in resolved and t in (None, "User")
    }
    wanted = list(targets | set(referenced))
    if not wanted:
        return
    visible = await proxy.visible_ids(
        call, wanted, {**referenced, **dict.fromkeys(targets, "User")}
    )
    for op in ops:
        if op.error is not None:
            continue
        path_id = op.path_id or ""
        if path_id in resolved and op.resource_type == "User" and resolved[path_id] not in visible:
            op.error = BrokerError(NOT_FOUND, status=404)
            continue
        for external, rtype in (op.names or {}).items():
            if (
                rtype in (None, "User")
                and external in resolved
                and resolved[external] not in visible
            ):
                op.error = InvalidValueError(
                    f"{external!r} does not name a resource you can refer to"
                )
                break


async def _respond(
    proxy: Proxy,
    call: Call,
    ops: list[_Op],
    results: list[dict[str, Any] | None],
    answers: list[dict[str, Any]],
    resolved: dict[str, str],
    write: HomeWrite,
) -> web.Response:
    """The bulk response in the caller's terms, after recording what home wrote."""
    schema = call.schema
    located: dict[str, str | None] = {}
    for answer in answers:
        parsed = schema.endpoints.parse_uri(str(answer.get("location", "")), proxy.home.base_url)
        if parsed is not None:
            located[parsed[1]] = parsed[0]
    found = await proxy.store.translate_outbound(call.domain.id, located, mint=call.domain.mints)
    call.internal_ids.update(located)
    replies = _Replies(
        {i: o.external_id for i, o in found.items()},
        {v: k for k, v in resolved.items()} | {i: o.external_id for i, o in found.items()},
    )
    pending = iter(answers)
    out: list[dict[str, Any]] = []
    for op, local in zip(ops, results, strict=True):
        if local is not None:
            out.append(local)
            continue
        reply = next(pending, None)
        if reply is None:
            break  # home stopped (its failOnErrors): the rest were not performed
        out.append(replies.result(proxy, call, op, reply))
    write = replace(write, external_ids=replies.external_ids)
    if write.written and await proxy.store.events_subscribed():
        # Home answered without the resources: read them, for the SETs.
        write = write.with_documents(await proxy.home.read_back(write.unread()))
    await proxy.journal.record(write)
    return await proxy.respond(call, 200, {"schemas": [BULK_RESPONSE], "Operations": out})


@dataclass
class _Replies:
    """Home's per-operation answers turned into the caller's terms."""

    ids: dict[str, str]
    """Internal -> the caller's ID, for every resource the answers locate."""
    replacements: dict[str, str]
    """Internal -> the caller's ID, for scrubbing home's error text."""
    external_ids: dict[str, str | None] = field(default_factory=dict)
    """The externalId each successful create gave its new resource, for the caller's record."""

    def result(self, proxy: Proxy, call: Call, op: _Op, reply: Mapping[str, Any]) -> dict[str, Any]:
        schema = call.schema
        result: dict[str, Any] = {k: reply[k] for k in ("method", "bulkId", "status") if k in reply}
        parsed = schema.endpoints.parse_uri(str(reply.get("location", "")), proxy.home.base_url)
        if parsed is not None and isinstance(reply.get("version"), str):
            version = present_etag(
                reply["version"], domain=call.domain.id, internal_id=parsed[1], sealer=proxy.sealer
            )
            if version:
                result["version"] = version
        if parsed is not None and parsed[1] in self.ids:
            result["location"] = schema.endpoints.uri(proxy.base, parsed[0], self.ids[parsed[1]])
            content = op.content
            succeeded = str(reply.get("status", "")).startswith("2")
            if isinstance(content, CanonicalResource) and content.external_id and succeeded:
                self.external_ids[parsed[1]] = content.external_id[0]
        if isinstance(reply.get("response"), dict):
            response = reply["response"]
            detail = scrub(str(response.get("detail", "")), self.replacements, proxy.id_pattern)
            status = response.get("status", reply.get("status", 500))
            result["response"] = error_document(
                int(status) if str(status).isdigit() else 500,
                detail,
                response.get("scimType") if isinstance(response.get("scimType"), str) else None,
            )
        return result
