"""Rewriting the IDs inside SCIM filters (RFC 7644 section 3.4.2.2) through scim2-models' AST.

Never by regular expressions over filter strings. Pure: :func:`filter_ids` lists what a filter
names, the shell resolves it in one query, :func:`rewrite_filter` rebuilds the filter.

What a filter can name:

- ``id`` and the ``value`` of a reference attribute (``members.value``, ``members[value eq ..]``,
  bare ``members eq ..``, ``groups.value``, enterprise ``manager.value``, schema-declared ones):
  an ID, compared with ``eq`` or ``ne``. Other operators on IDs (``sw``, ``gt``, ...) would let a
  domain probe the shape or order of IDs it must not see, and are refused.
- ``$ref`` sub-attributes and plain reference attributes: URIs, rewritten likewise.
- ``externalId``: the calling domain's own value, which home never sees; ``externalId eq "x"``
  becomes ``id eq`` the entities the domain gave that externalId.

An ID the caller has no mapping for matches nothing: it is replaced by a value no resource has,
so ``eq`` matches nothing and ``ne`` everything, as for a random string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scim2_models import InvalidFilterException, ScimFilter
from scim2_models.path import (
    AttrPath,
    CompareOperator,
    Comparison,
    FilterNode,
    FilterVisitor,
    LogicalExpr,
    LogicalOperator,
    Not,
    Present,
    ValuePath,
)

from broker.errors import BrokerError
from broker.scim.rewrite import Translation
from broker.scim.schemas import ReferenceMap

__all__ = ["NO_SUCH_ID", "FilterError", "FilterIds", "filter_ids", "parse_filter", "rewrite_filter"]

# A value no resource has: what an unknown ID becomes inside a filter.
NO_SUCH_ID = "urn:broker:no-such-id"
_ID_OPERATORS = {CompareOperator.eq, CompareOperator.ne}


class FilterError(BrokerError):
    status = 400
    scim_type = "invalidFilter"


def parse_filter(text: str) -> FilterNode:
    """The AST of ``text``; FilterError (400 invalidFilter) with scim2-models' reason if invalid."""
    try:
        ast = ScimFilter(text).ast
    except InvalidFilterException as exc:
        raise FilterError(f"invalid filter: {exc.detail}") from exc
    except ValueError as exc:
        raise FilterError(f"invalid filter: {exc}") from exc
    assert ast is not None
    return ast


@dataclass
class FilterIds:
    """What a filter names: IDs, URIs (as IDs, with their resource type) and externalId values."""

    ids: dict[str, str | None] = field(default_factory=dict)
    external_ids: set[str] = field(default_factory=set)


def _classify(path: AttrPath, parent: AttrPath | None, refs: ReferenceMap) -> str:
    owner = parent if parent is not None else path
    sub_name = path.attr if parent is not None else path.sub_attr
    name = owner.attr.lower()
    sub = sub_name.lower() if sub_name else None
    extension = owner.uri if owner.uri and refs.is_extension(owner.uri) else None
    if extension is None and parent is None and sub is None:
        if name == "id":
            return "id"
        if name == "externalid":
            return "external_id"
    if extension is None and name == "meta" and sub == "location":
        return "uri"
    attr = refs.attribute(name, extension)
    if attr is None:
        return "other"
    if not attr.complex:
        return "uri" if sub is None else "other"
    if sub in (None, "value"):
        return "id"
    if sub == "$ref":
        return "uri"
    return "other"


class _Rewriter(FilterVisitor[FilterNode]):
    """Applies ``on_comparison`` to every comparison, with the value path it sits in if any."""

    def __init__(
        self,
        on_comparison: Callable[[Comparison, AttrPath | None], FilterNode],
        parent: AttrPath | None = None,
    ) -> None:
        self.on_comparison = on_comparison
        self.parent = parent

    def visit_comparison(self, node: Comparison) -> FilterNode:
        return self.on_comparison(node, self.parent)

    def visit_present(self, node: Present) -> FilterNode:
        return node

    def visit_not(self, node: Not) -> FilterNode:
        return dataclasses.replace(node, expr=self.visit(node.expr))

    def visit_logical_expr(self, node: LogicalExpr) -> FilterNode:
        return dataclasses.replace(node, terms=tuple(self.visit(t) for t in node.terms))

    def visit_value_path(self, node: ValuePath) -> FilterNode:
        inner = _Rewriter(self.on_comparison, node.attr_path)
        return dataclasses.replace(node, val_filter=inner.visit(node.val_filter))


def _check_operator(node: Comparison, what: str) -> None:
    if node.op not in _ID_OPERATORS:
        raise FilterError(
            f"{node.attr_path} holds {what}: through the broker it can only be compared with eq or ne"
        )


def filter_ids(ast: FilterNode, translation: Translation) -> FilterIds:
    """Every ID, URI and externalId value ``ast`` compares against."""
    refs, endpoints, base = translation.refs, translation.endpoints, translation.source_base
    found = FilterIds()

    def visit(node: Comparison, parent: AttrPath | None) -> FilterNode:
        kind = _classify(node.attr_path, parent, refs)
        if kind == "other" or not isinstance(node.value, str):
            return node
        if kind == "external_id":
            _check_operator(node, "your externalId")
            found.external_ids.add(node.value)
        elif kind == "id":
            _check_operator(node, "an ID")
            found.ids.setdefault(node.value, None)
        else:
            _check_operator(node, "a reference")
            parsed = endpoints.parse_uri(node.value, base)
            if parsed is not None:
                found.ids[parsed[1]] = parsed[0]
        return node

    _Rewriter(visit).visit(ast)
    return found


def rewrite_filter(
    ast: FilterNode,
    translation: Translation,
    *,
    ids: Mapping[str, str],
    external_ids: Mapping[str, list[str]],
) -> FilterNode:
    """``ast`` with IDs from ``ids``, URIs moved to the target base, and externalId comparisons
    turned into comparisons of ``id`` with the entities of ``external_ids``."""
    refs, endpoints = translation.refs, translation.endpoints
    source_base, target_base = translation.source_base, translation.target_base

    def visit(node: Comparison, parent: AttrPath | None) -> FilterNode:
        kind = _classify(node.attr_path, parent, refs)
        value: Any = node.value
        if kind == "other" or not isinstance(value, str):
            return node
        if kind == "id":
            return dataclasses.replace(node, value=ids.get(value, NO_SUCH_ID))
        if kind == "uri":
            parsed = endpoints.parse_uri(value, source_base)
            target = ids.get(parsed[1]) if parsed else None
            if parsed is None or target is None:
                return dataclasses.replace(node, value=NO_SUCH_ID)
            return dataclasses.replace(node, value=endpoints.uri(target_base, parsed[0], target))
        matches = external_ids.get(value) or [NO_SUCH_ID]
        id_path = AttrPath(attr="id")
        terms = tuple(Comparison(id_path, node.op, internal) for internal in matches)
        if len(terms) == 1:
            return terms[0]
        op = LogicalOperator.or_ if node.op is CompareOperator.eq else LogicalOperator.and_
        return LogicalExpr(op, terms)

    return _Rewriter(visit).visit(ast)
