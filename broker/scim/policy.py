"""A domain's policy, decided as pure functions over the canonical request (DESIGN section 8).

- **Scope**: a SCIM filter bounding which users a domain sees. Reads and lists AND it into the
  query at home; a create is checked against it here (:func:`matches`) before home sees it; a
  group write keeps the members the domain cannot see (:func:`keep_hidden_members`).
- **Read list**: the attributes a domain is shown (:meth:`DomainPolicy.readable`), and the only
  ones it may name in ``filter`` and ``sortBy`` (:func:`check_filter`, :func:`check_sort`), so a
  hidden value cannot be recovered a character at a time.
- **Write list**: the attributes a domain may set, by POST, PUT, PATCH or Bulk
  (:func:`check_write`).

Every name is an :class:`~broker.scim.attributes.AttrRef`, resolved by the canonical request, so
``TITLE``, ``title`` and ``urn:...:User:title`` are one attribute here.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scim2_models.path import (
    AttrPath,
    CompareOperator,
    Comparison,
    FilterNode,
    LogicalExpr,
    LogicalOperator,
    Not,
    Present,
    ValuePath,
)

from broker.errors import ForbiddenError, InvalidValueError
from broker.scim.attributes import AttrRef, ResourceSchema
from broker.scim.canonical import PATCH_OP, CanonicalResource, filter_attributes, resolve_path
from broker.scim.filters import FilterError
from broker.scim.patch import PatchRequest, parse_patch

__all__ = [
    "DomainPolicy",
    "check_create_scope",
    "check_filter",
    "check_sort",
    "check_write",
    "keep_hidden_in_document",
    "keep_hidden_members",
    "matches",
    "members_by_value",
    "put_as_patch",
]

_ALWAYS = {"id", "externalid", "meta", "schemas"}
"""Attributes every domain reads: its own ID and externalId, meta and schemas."""
_TIMES = {"created", "lastmodified"}


@dataclass(frozen=True)
class DomainPolicy:
    """What one domain may see and do."""

    domain: str
    scope: str | None = None
    """A SCIM filter on users; None: every user."""
    read: tuple[str, ...] | None = None
    """Attribute names (plain, URN-qualified, or a whole extension's URN); None: all."""
    write: tuple[str, ...] | None = None
    unlinkable: bool = False
    """Timestamps are coarsened for this domain, so it may not filter or sort on them."""
    _refs: dict[tuple[int, str], tuple[ResourceSchema, frozenset[AttrRef]]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )
    _rules: dict[int, tuple[ResourceSchema, dict[str, bool | str]]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def scope_for(self, resource_type: str | None) -> str | None:
        """The scope where it applies: it bounds which users a domain sees."""
        return self.scope if resource_type == "User" else None

    def refs(self, which: str, schema: ResourceSchema) -> frozenset[AttrRef] | None:
        names = self.read if which == "read" else self.write
        if names is None:
            return None
        key = (id(schema), which)
        hit = self._refs.get(key)
        if hit is not None and hit[0] is schema:
            return hit[1]
        refs: set[AttrRef] = set()
        for name in names:
            urn = schema.extension(name)
            if urn is not None:
                refs.update(r for r in schema.all_refs() if r.extension == urn)
                continue
            resolved = schema.resolve(name)
            if resolved is not None:
                refs.add(resolved[0])
        found = frozenset(refs)
        self._refs[key] = (schema, found)
        return found

    def may_read(self, ref: AttrRef, schema: ResourceSchema) -> bool:
        if ref.extension is None and ref.name.lower() in _ALWAYS:
            return True
        allowed = self.refs("read", schema)
        return allowed is None or ref in allowed

    def readable(self, doc: dict[str, Any], schema: ResourceSchema | None) -> dict[str, Any]:
        """The attributes of ``doc`` the domain may read; extension attributes one by one."""
        if self.read is None:
            return doc
        if schema is None:
            return {k: v for k, v in doc.items() if k.lower() in _ALWAYS}
        out: dict[str, Any] = {}
        dropped: set[str] = set()
        known = self._rules_for(schema)
        for key, value in doc.items():
            rule = known.get(key)
            if rule is None:
                rule = self._rule(schema, key)
            if rule is True:
                out[key] = value
            elif rule and isinstance(value, dict):  # an extension: its attributes one by one
                kept = {k: v for k, v in value.items() if self._rule(schema, f"{rule}:{k}") is True}
                if kept:
                    out[key] = kept
                else:
                    dropped.add(key.lower())
        if dropped and isinstance(out.get("schemas"), list):
            out["schemas"] = [s for s in out["schemas"] if str(s).lower() not in dropped]
        return out

    def _rule(self, schema: ResourceSchema, key: str) -> bool | str:
        """Whether a key of home's resources is readable (True, False), or the URN of the
        extension whose attributes are judged one by one: decided once per schema and key, as
        the keys of home's resources repeat from one resource to the next."""
        rules = self._rules_for(schema)
        rule = rules.get(key)
        if rule is None:
            urn = schema.extension(key)
            if urn is not None:
                rule = urn
            else:
                resolved = schema.resolve(key)
                rule = resolved is not None and self.may_read(resolved[0], schema)
            if len(rules) < 4096:  # home's keys: a few dozen; never an unbounded memo
                rules[key] = rule
        return rule

    def _rules_for(self, schema: ResourceSchema) -> dict[str, bool | str]:
        cache = self._rules.get(id(schema))
        if cache is None or cache[0] is not schema:
            cache = (schema, {})
            self._rules[id(schema)] = cache
        return cache[1]


def check_write(policy: DomainPolicy, schema: ResourceSchema, refs: Iterable[AttrRef]) -> None:
    """400 ``mutability`` naming every attribute the domain may not write."""
    allowed = policy.refs("write", schema)
    if allowed is None:
        return
    refused = sorted(
        {
            str(r)
            for r in refs
            if r not in allowed and not (r.extension is None and r.name.lower() in _ALWAYS)
        }
    )
    if refused:
        raise InvalidValueError(
            f"domain {policy.domain} may not write {', '.join(refused)}", scim_type="mutability"
        )


def _check_named(
    policy: DomainPolicy,
    schemas: Sequence[ResourceSchema],
    path: AttrPath,
    what: str,
    error: type[InvalidValueError] | type[FilterError],
) -> None:
    shown = f"{path.uri}:{path.attr}" if path.uri else path.attr
    found: list[tuple[ResourceSchema, AttrRef]] = []
    for schema in schemas:
        try:
            ref, _attr = resolve_path(path, schema)
        except InvalidValueError:
            continue
        found.append((schema, ref))
    if not found:
        raise error(f"{what} names {shown!r}, which no resource type here has (see /Schemas)")
    for schema, ref in found:
        if ref.extension is None and ref.name.lower() == "meta":
            # meta.location holds home's ID; meta.version is sealed per domain (comparing it
            # would bisect home's counter); an unlinkable domain's timestamps are coarsened.
            sub = (path.sub_attr or "").lower()
            if sub not in ("resourcetype", *_TIMES) or (policy.unlinkable and sub in _TIMES):
                raise error(f"{what} cannot name meta.{path.sub_attr or ''} through the broker")
        if ref.extension is None and ref.name.lower() == "id" and what == "sortBy":
            raise error("sortBy cannot name id through the broker: sort by another attribute")
        if policy.may_read(ref, schema):
            return
    raise error(f"domain {policy.domain} may not read {shown}, so it cannot name it in {what}")


def check_filter(policy: DomainPolicy, schemas: Sequence[ResourceSchema], ast: FilterNode) -> None:
    """400 ``invalidFilter`` if the filter names an attribute the domain may not read."""
    for path in filter_attributes(ast):
        _check_named(policy, schemas, path, "the filter", FilterError)


def check_sort(policy: DomainPolicy, schemas: Sequence[ResourceSchema], sort_by: str) -> None:
    """400 ``invalidValue`` if ``sortBy`` names an attribute the domain may not read."""
    from scim2_models import InvalidPathException, Path

    try:
        ast = Path(sort_by).ast
    except (InvalidPathException, ValueError) as exc:
        raise InvalidValueError(f"sortBy {sort_by!r} is not an attribute path") from exc
    if not isinstance(ast, AttrPath):
        raise InvalidValueError(f"sortBy {sort_by!r} is not an attribute path")
    _check_named(policy, schemas, ast, "sortBy", InvalidValueError)


# ---------------------------------------------------------------------------- scope of a create


def _values(doc: Mapping[str, Any], path: AttrPath, schema: ResourceSchema) -> list[Any]:
    """The values ``path`` names in ``doc`` (a multi-valued attribute gives each value)."""
    try:
        ref, attr = resolve_path(path, schema)
    except InvalidValueError:
        return []
    container: Any = doc
    if ref.extension is not None:
        container = next((v for k, v in doc.items() if k.lower() == ref.extension.lower()), None)
        if not isinstance(container, Mapping):
            return []
    value = next((v for k, v in container.items() if k.lower() == ref.name.lower()), None)
    items = value if isinstance(value, list) else [] if value is None else [value]
    if attr is not None and attr.type == "complex":
        sub = (path.sub_attr or "value").lower()
        return [
            next((v for k, v in item.items() if k.lower() == sub), None)
            for item in items
            if isinstance(item, Mapping)
        ]
    return items


def _compare(op: CompareOperator, actual: Any, expected: Any) -> bool:
    if actual is None:
        return False
    if isinstance(actual, str) and isinstance(expected, str):
        a, e = actual.lower(), expected.lower()
    else:
        a, e = actual, expected
    try:
        if op is CompareOperator.eq:
            return bool(a == e)
        if op is CompareOperator.ne:
            return bool(a != e)
        if op is CompareOperator.co:
            return isinstance(a, str) and e in a
        if op is CompareOperator.sw:
            return isinstance(a, str) and a.startswith(e)
        if op is CompareOperator.ew:
            return isinstance(a, str) and a.endswith(e)
        if op is CompareOperator.gt:
            return bool(a > e)
        if op is CompareOperator.ge:
            return bool(a >= e)
        if op is CompareOperator.lt:
            return bool(a < e)
        if op is CompareOperator.le:
            return bool(a <= e)
    except TypeError:
        return False
    return False


def matches(ast: FilterNode, doc: Mapping[str, Any], schema: ResourceSchema) -> bool:
    """Whether ``doc`` satisfies the filter (RFC 7644 section 3.4.2.2), strings compared without
    regard to case: how a create is held to the domain's scope before it reaches home."""
    if isinstance(ast, Comparison):
        values = _values(doc, ast.attr_path, schema)
        if ast.op is CompareOperator.ne:
            return all(_compare(ast.op, v, ast.value) for v in values)
        return any(_compare(ast.op, v, ast.value) for v in values)
    if isinstance(ast, Present):
        return any(v not in (None, "", [], {}) for v in _values(doc, ast.attr_path, schema))
    if isinstance(ast, Not):
        return not matches(ast.expr, doc, schema)
    if isinstance(ast, LogicalExpr):
        results = (matches(t, doc, schema) for t in ast.terms)
        return all(results) if ast.op is LogicalOperator.and_ else any(results)
    if isinstance(ast, ValuePath):
        key = ast.attr_path.attr.lower()
        items = next((v for k, v in doc.items() if k.lower() == key), None)
        if not isinstance(items, list):
            items = [items] if isinstance(items, Mapping) else []
        return any(
            isinstance(item, Mapping) and _matches_item(ast.val_filter, item) for item in items
        )
    return False


def _matches_item(ast: FilterNode, item: Mapping[str, Any]) -> bool:
    if isinstance(ast, Comparison):
        key = ast.attr_path.attr.lower()
        return _compare(
            ast.op, next((v for k, v in item.items() if k.lower() == key), None), ast.value
        )
    if isinstance(ast, Present):
        key = ast.attr_path.attr.lower()
        return next((v for k, v in item.items() if k.lower() == key), None) not in (None, "")
    if isinstance(ast, Not):
        return not _matches_item(ast.expr, item)
    if isinstance(ast, LogicalExpr):
        results = (_matches_item(t, item) for t in ast.terms)
        return all(results) if ast.op is LogicalOperator.and_ else any(results)
    return False


def check_create_scope(
    policy: DomainPolicy,
    scope_ast: FilterNode | None,
    doc: Mapping[str, Any],
    schema: ResourceSchema,
) -> None:
    """403 if a domain with a scope creates a user outside it (it could never see it)."""
    if scope_ast is not None and not matches(scope_ast, doc, schema):
        raise ForbiddenError(
            f"domain {policy.domain} may create only users within its scope ({policy.scope})"
        )


# ---------------------------------------------------------------------------- group members


_VALUE_EQ = re.compile(r"^value$", re.IGNORECASE)


def members_by_value(ast: FilterNode) -> bool:
    """Whether a ``members[...]`` filter selects members only by ``value eq``: the one form a
    domain with a scope may use, since any other could select members it cannot see."""
    if isinstance(ast, Comparison):
        return ast.op is CompareOperator.eq and bool(_VALUE_EQ.match(ast.attr_path.attr))
    if isinstance(ast, LogicalExpr) and ast.op is LogicalOperator.or_:
        return all(members_by_value(t) for t in ast.terms)
    return False


def _value_of(item: Any) -> str | None:
    if not isinstance(item, Mapping):
        return None
    value = item.get("value")
    return value if isinstance(value, str) else None


def _select(ids: Sequence[str]) -> str:
    terms = tuple(Comparison(AttrPath(attr="value"), CompareOperator.eq, i) for i in ids)
    node: FilterNode = terms[0] if len(terms) == 1 else LogicalExpr(LogicalOperator.or_, terms)
    return f"members[{node}]"


def keep_hidden_members(
    operations: Sequence[Mapping[str, Any]],
    current: Sequence[str],
    hidden: Collection[str],
) -> list[dict[str, Any]]:
    """A group PATCH's operations (home's IDs) rewritten so that the members in ``hidden`` (the
    group's current members the domain cannot see) stay members: a replace of ``members`` keeps
    them, a remove of all members removes only the visible ones. ``current``: the group's
    members at home now. Operations naming members by value pass unchanged."""
    visible = [m for m in current if m not in hidden]
    kept = [{"value": m} for m in current if m in hidden]
    out: list[dict[str, Any]] = []
    for raw in operations:
        op = dict(raw)
        path = op.get("path")
        if path is None and isinstance(op.get("value"), dict) and "members" in op["value"]:
            if op["op"] == "replace":
                value = dict(op["value"])
                value["members"] = [*(value["members"] or []), *_missing(kept, value["members"])]
                op["value"] = value
        elif path == "members":
            if op["op"] == "replace":
                given = op.get("value")
                items: list[Any] = given if isinstance(given, list) else []
                op["value"] = [*items, *_missing(kept, items)]
            elif op["op"] == "remove":
                listed = [v for v in map(_value_of, op.get("value") or []) if v]
                targets = listed if "value" in op else visible
                if not targets:
                    continue
                op = {"op": "remove", "path": _select(targets)}
        out.append(op)
    return out


def _missing(kept: list[dict[str, Any]], value: Any) -> list[dict[str, Any]]:
    present = {_value_of(v) for v in value} if isinstance(value, list) else set()
    return [k for k in kept if k["value"] not in present]


def keep_hidden_in_document(
    doc: dict[str, Any], current: Sequence[str], hidden: Collection[str]
) -> dict[str, Any]:
    """A group PUT (home's IDs) with the members the domain cannot see kept."""
    kept = [{"value": m} for m in current if m in hidden]
    given = doc.get("members")
    members: list[Any] = given if isinstance(given, list) else []
    return {**doc, "members": [*members, *_missing(kept, members)]}


def put_as_patch(
    canonical: CanonicalResource,
    policy: DomainPolicy,
    resource: ResourceSchema,
    current: Mapping[str, Any],
) -> PatchRequest:
    """A PUT by a domain with a write list, as the PATCH it amounts to: each attribute it may
    write is replaced by the PUT's value, or removed if the PUT leaves it out and home has it.
    Pure."""
    allowed = policy.refs("write", resource) or frozenset()
    operations: list[dict[str, Any]] = []
    for ref in sorted(allowed, key=str):
        if ref.extension is None and ref.name.lower() in ("id", "meta", "schemas", "externalid"):
            continue
        container = (
            canonical.attrs if ref.extension is None else canonical.attrs.get(ref.extension, {})
        )
        path = str(ref)
        if ref in canonical.written:
            operations.append({"op": "replace", "path": path, "value": container[ref.name]})
        elif _has(current, ref):
            operations.append({"op": "remove", "path": path})
    body: dict[str, Any] = {"schemas": [PATCH_OP]}
    body["Operations"] = operations or [{"op": "add", "value": {}}]
    patch = parse_patch(body)
    if not operations:
        patch.operations = []
    return patch


def _has(doc: Mapping[str, Any], ref: AttrRef) -> bool:
    container: Any = doc
    if ref.extension is not None:
        container = next((v for k, v in doc.items() if k.lower() == ref.extension.lower()), None)
        if not isinstance(container, Mapping):
            return False
    value = next((v for k, v in container.items() if k.lower() == ref.name.lower()), None)
    return value not in (None, [], {})
