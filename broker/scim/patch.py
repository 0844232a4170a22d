"""SCIM PATCH requests (RFC 7644 section 3.5.2) checked and rewritten inbound, as pure functions.

Each operation's ``path`` is parsed by scim2-models; a value filter inside it is rewritten like any
filter. Each operation's ``value`` is wrapped into a partial resource at the place the path names
and rewritten by the document rewriter, so members, groups, manager and schema-declared references
are handled the same way in PATCH as in POST and PUT. ``externalId`` operations are taken out: the
value belongs to the calling domain and never reaches home.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scim2_models import InvalidPathException, Path
from scim2_models.path import AttrPath, Comparison, ValuePath

from broker.errors import BrokerError
from broker.scim.filters import FilterIds, filter_ids, rewrite_filter
from broker.scim.rewrite import IdVisitor, Translation, collect_ids, rewrite_document
from broker.scim.schemas import ReferenceMap

__all__ = ["PATCH_OP", "PatchError", "PatchRequest", "parse_patch"]

PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
_OPS = {"add", "remove", "replace"}


class PatchError(BrokerError):
    status = 400

    def __init__(self, detail: str, scim_type: str = "invalidSyntax") -> None:
        super().__init__(detail, scim_type=scim_type)


@dataclass
class _Op:
    op: str
    path: Path[Any] | None
    value: Any
    raw: dict[str, Any]


@dataclass
class PatchRequest:
    """A checked PATCH request: its operations, and the externalId it sets for the caller."""

    operations: list[_Op]
    external_id: tuple[str | None] | None = None
    """(value,) when an operation sets or removes externalId (None: removed); None if untouched."""
    extra: dict[str, Any] = field(default_factory=dict)

    def ids(self, translation: Translation) -> FilterIds:
        """Every ID the operations name, in paths and in values."""
        found = FilterIds()
        for op in self.operations:
            path_filter = _path_filter(op)
            if path_filter is not None:
                named = filter_ids(path_filter, translation)
                found.ids.update(named.ids)
                found.external_ids |= named.external_ids
            wrapped = _wrap(op, translation.refs)
            if wrapped is not None:
                for key, rtype in collect_ids(wrapped[0], translation).items():
                    if found.ids.get(key) is None:
                        found.ids[key] = rtype
        return found

    def rewrite(
        self,
        translation: Translation,
        *,
        translate: IdVisitor,
        ids: Mapping[str, str],
        external_ids: Mapping[str, list[str]],
    ) -> dict[str, Any]:
        """The request home receives; raises UnknownReference for a value naming an unknown ID."""
        operations = []
        for op in self.operations:
            out = dict(op.raw)
            path_filter = _path_filter(op)
            if path_filter is not None:
                rewritten = rewrite_filter(
                    path_filter, translation, ids=ids, external_ids=external_ids
                )
                out["path"] = str(rewritten)
            wrapped = _wrap(op, translation.refs)
            if wrapped is not None:
                doc, unwrap = wrapped
                out["value"] = unwrap(rewrite_document(doc, translation, translate, strict=True))
            operations.append(out)
        return {**self.extra, "schemas": [PATCH_OP], "Operations": operations}


def _path_filter(op: _Op) -> Any | None:
    """The filter inside a PATCH path (``members[value eq ".."]``), if it has one."""
    if op.path is None or op.path.ast is None or isinstance(op.path.ast, AttrPath):
        return None
    return op.path.ast


def _target(path: Path[Any]) -> tuple[AttrPath, str | None, bool]:
    """(attribute path, sub-attribute, selects values by a filter) of a PATCH path."""
    ast = path.ast
    if isinstance(ast, ValuePath):
        return ast.attr_path, ast.sub_attr, True
    if isinstance(ast, Comparison):
        return ast.attr_path, None, True
    assert isinstance(ast, AttrPath)
    return ast, ast.sub_attr, False


def _wrap(
    op: _Op, refs: ReferenceMap
) -> tuple[dict[str, Any], Callable[[dict[str, Any]], Any]] | None:
    """A partial resource holding ``op.value`` where its path points, and how to take it back out."""
    if op.value is None:
        return None
    if op.path is None or op.path.ast is None:
        if not isinstance(op.value, dict):
            return None
        return op.value, lambda doc: doc
    attr_path, sub, filtered = _target(op.path)
    name = attr_path.attr
    value = op.value
    whole = f"{attr_path.uri}:{name}" if attr_path.uri else None
    if whole is not None and sub is None and not filtered and isinstance(value, dict):
        # The path names a whole schema (scim2-models reads its last segment as the attribute).
        if refs.is_extension(whole):
            return {whole: value}, lambda doc: doc[whole]
        if ":core:" in whole.lower():
            return value, lambda doc: doc
    if sub is not None:
        inner: dict[str, Any] = {name: {sub: value}}

        def take(attrs: dict[str, Any]) -> Any:
            return attrs[name][sub] if name in attrs else value
    elif filtered and isinstance(value, dict):
        inner = {name: [value]}

        def take(attrs: dict[str, Any]) -> Any:
            return attrs[name][0]
    else:
        inner = {name: value}

        def take(attrs: dict[str, Any]) -> Any:
            return attrs[name]

    uri = attr_path.uri
    if uri and refs.is_extension(uri):
        return {uri: inner}, lambda doc: take(doc[uri])
    return inner, take


def parse_patch(body: Any) -> PatchRequest:
    """Check a PATCH body's structure; PatchError says what is wrong with which operation."""
    if not isinstance(body, dict):
        raise PatchError("a PATCH body is a JSON object with schemas and Operations")
    schemas = body.get("schemas")
    if not isinstance(schemas, list) or PATCH_OP not in schemas:
        raise PatchError(f'a PATCH body must list "{PATCH_OP}" in schemas', "invalidValue")
    raw_ops = next((v for k, v in body.items() if k.lower() == "operations"), None)
    if not isinstance(raw_ops, list) or not raw_ops:
        raise PatchError("a PATCH body needs a non-empty Operations list", "invalidValue")
    operations: list[_Op] = []
    external_id: tuple[str | None] | None = None
    for n, raw in enumerate(raw_ops, start=1):
        op, value_external_id = _parse_op(n, raw)
        if value_external_id is not None:
            external_id = value_external_id
        if op is not None:
            operations.append(op)
    extra = {k: v for k, v in body.items() if k not in ("schemas",) and k.lower() != "operations"}
    return PatchRequest(operations, external_id, extra)


def _parse_op(n: int, raw: Any) -> tuple[_Op | None, tuple[str | None] | None]:
    """Operation ``n``, checked; and the externalId it sets for the caller ((value,), or None if
    it sets none). The operation is None when all it does is set externalId."""
    if not isinstance(raw, dict):
        raise PatchError(f"operation {n} is not a JSON object")
    op = str(raw.get("op", "")).lower()
    if op not in _OPS:
        raise PatchError(
            f"operation {n}: {raw.get('op')!r} is not add, remove or replace", "invalidValue"
        )
    path = _parse_path(n, raw.get("path"))
    if op == "remove" and (path is None or path.ast is None):
        raise PatchError(f"operation {n}: remove needs a path", "noTarget")
    if op != "remove" and "value" not in raw:
        raise PatchError(f"operation {n}: {op} needs a value", "invalidValue")
    value = raw.get("value")
    if (
        path is not None
        and isinstance(path.ast, AttrPath)
        and not path.ast.uri
        and path.ast.sub_attr is None
    ):
        name = path.ast.attr.lower()
        if name == "id":
            raise PatchError(f"operation {n}: id is read-only", "mutability")
        if name == "externalid":
            if op != "remove" and not isinstance(value, str):
                raise PatchError(f"operation {n}: externalId must be a string", "invalidValue")
            return None, (None if op == "remove" else value,)
    if path is None and isinstance(value, dict):
        key = next((k for k in value if k.lower() == "externalid"), None)
        if key is not None:
            value = {k: v for k, v in value.items() if k != key}
            found = (raw["value"][key],)
            if not value:
                return None, found
            return _Op(op, path, value, {**raw, "value": value}), found
    return _Op(op, path, value, raw), None


def _parse_path(n: int, path_text: Any) -> Path[Any] | None:
    if path_text is None:
        return None
    if not isinstance(path_text, str):
        raise PatchError(f"operation {n}: path must be a string", "invalidPath")
    try:
        return Path(path_text)
    except (InvalidPathException, ValueError) as exc:
        detail = getattr(exc, "detail", None) or str(exc)
        raise PatchError(
            f"operation {n}: invalid path {path_text!r}: {detail}", "invalidPath"
        ) from exc
