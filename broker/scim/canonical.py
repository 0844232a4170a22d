"""The canonical request: what a domain sent, parsed once into one unambiguous form. Pure.

Every byte of a domain's request is the attacker's (DESIGN section 8). Before any policy is
applied or anything reaches home, the request is brought to one form:

- a path is refused if it smuggles anything: an encoded ``/``, ``?``, ``#`` or ``\\``, a ``.`` or
  ``..`` segment, a control character (:func:`path_segments`);
- a body is strict UTF-8 JSON with no duplicate key, no NaN, no NUL or lone surrogate in any
  string, and at most :data:`MAX_DEPTH` levels deep (:func:`parse_body`);
- every attribute name is resolved case-insensitively, URN-qualified names to their schema
  (RFC 7643 section 2.1), and two keys naming one attribute are refused
  (:func:`canonical_resource`, :func:`canonical_patch`); PATCH operation keys are
  case-insensitive too (RFC 7644 section 3.5.2).

What comes out names each attribute exactly one way (the schema's spelling, extension
attributes inside their extension's object), so the write list, the read list, the rewriter and
``externalId`` handling cannot be walked around by spelling.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from scim2_models import InvalidPathException, Path
from scim2_models.path import AttrPath, Comparison, FilterNode, Not, Present, ValuePath

from broker.errors import InvalidValueError
from broker.scim.attributes import Attribute, AttrRef, ResourceSchema

__all__ = [
    "MAX_DEPTH",
    "PATCH_OP",
    "CanonicalPatch",
    "CanonicalResource",
    "canonical_keys",
    "canonical_patch",
    "canonical_resource",
    "check_text",
    "filter_attributes",
    "parse_body",
    "path_segments",
    "resolve_path",
]

PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
MAX_DEPTH = 32
"""Deepest nesting of a request body: a SCIM resource needs five levels."""
MAX_STRING = 32 * 1024
"""Longest string in a request, in characters: a certificate fits, a 100,000-character
``userName`` does not."""
_SMUGGLED = ("%2f", "%3f", "%23", "%5c", "%00")
_PATH_CONTROL = re.compile("[\x00-\x1f\x7f]")
"""A control character, refused in a path segment (searched in C: issue 15)."""
_TEXT_REFUSED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
"""What :func:`check_text` refuses: a control character other than tab and newlines, or a lone
surrogate."""
_OPS = {"add", "remove", "replace"}


def _syntax(detail: str) -> InvalidValueError:
    return InvalidValueError(detail, scim_type="invalidSyntax")


def path_segments(raw_path: str) -> list[str]:
    """The decoded segments of a request path as it came on the wire (``request.raw_path``),
    or InvalidValueError (400 ``invalidPath``) if it tries to smuggle a path or a query."""
    path = raw_path.split("?", 1)[0]
    lowered = path.lower()
    if any(bad in lowered for bad in _SMUGGLED):
        raise InvalidValueError(
            "the path holds an encoded '/', '?', '#', '\\' or NUL: name a resource plainly",
            scim_type="invalidPath",
        )
    segments = [unquote(s, errors="strict") for s in path.split("/")[1:]]
    for segment in segments:
        if segment in (".", "..") or _PATH_CONTROL.search(segment) is not None:
            raise InvalidValueError(
                "the path holds a '.' or '..' segment or a control character",
                scim_type="invalidPath",
            )
    return segments


def check_text(value: str, where: str) -> str:
    """``value`` if it holds no NUL, control character other than tab and newlines, or lone
    surrogate, and is at most :data:`MAX_STRING` characters; InvalidValueError naming ``where``
    otherwise."""
    if len(value) > MAX_STRING:
        raise InvalidValueError(f"{where} is longer than {MAX_STRING} characters")
    if _TEXT_REFUSED.search(value) is not None:
        raise InvalidValueError(
            f"{where} holds a NUL, a control character or a lone surrogate: remove it"
        )
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _syntax(f"the key {key!r} appears twice in one JSON object")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise _syntax(f"{name} is not a JSON value")


def parse_body(raw: bytes) -> Any:
    """A request body: strict UTF-8 JSON (RFC 8259 section 8.1), checked as described above."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _syntax(
            f"the body is not UTF-8 (byte {exc.start}): send UTF-8 JSON (RFC 8259)"
        ) from exc
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except InvalidValueError:
        raise
    except RecursionError as exc:
        raise _syntax(f"the body is nested more than {MAX_DEPTH} levels deep") from exc
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        raise _syntax(f"the body is not valid JSON: {exc}") from exc
    _check_tree(value)
    return value


def _check_tree(value: Any) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _syntax(f"the body is nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, str):
            check_text(item, "a string in the body")
        elif isinstance(item, dict):
            for key, sub in item.items():
                check_text(key, "a key in the body")
                stack.append((sub, depth + 1))
        elif isinstance(item, list):
            stack.extend((sub, depth + 1) for sub in item)


# ---------------------------------------------------------------------------- resources


@dataclass
class CanonicalResource:
    """A resource a domain writes, in canonical form."""

    attrs: dict[str, Any]
    """Core attributes by their schema spelling, extension attributes inside their extension's
    object (keyed by its URN as spelt); no ``id``, ``meta`` or ``externalId``."""
    external_id: tuple[str | None] | None = None
    """(value,) when the domain set its own externalId (None: cleared); None if it did not."""
    written: set[AttrRef] = field(default_factory=set)
    """Every attribute the resource sets (``schemas`` and ``externalId`` left out)."""


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, dict | list):
        raise InvalidValueError(f"{where} takes a single value, not an object or a list")
    return value


def _complex_item(value: Any, attr: Attribute, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidValueError(f"{where}: each value of {attr.name} is a JSON object")
    out: dict[str, Any] = {}
    for key, sub_value in value.items():
        sub = attr.sub(key)
        if sub is None and attr.sub_attributes:
            raise InvalidValueError(f"{where}: {attr.name} has no sub-attribute {key!r}")
        name = sub.name if sub is not None else key
        if name in out:
            raise _syntax(f"{where}: {attr.name}.{name} is given twice (as {key!r})")
        if sub is not None and sub.multi_valued and isinstance(sub_value, list):
            out[name] = [_scalar(v, f"{where}: {attr.name}.{name}") for v in sub_value]
        else:
            out[name] = _scalar(sub_value, f"{where}: {attr.name}.{name}")
    return out


def canonical_value(attr: Attribute, value: Any, where: str, *, item: bool = False) -> Any:
    """``value`` for ``attr`` with its sub-attribute names canonical. ``item``: one value of a
    multi-valued attribute is allowed where the whole list is expected (PATCH ``add``)."""
    if value is None:
        return None
    if attr.multi_valued and isinstance(value, list):
        if attr.type == "complex":
            return [_complex_item(v, attr, where) for v in value]
        return [_scalar(v, f"{where}: {attr.name}") for v in value]
    if attr.multi_valued and not item:
        raise InvalidValueError(f"{where}: {attr.name} is multi-valued: give a JSON array")
    if attr.type == "complex":
        return _complex_item(value, attr, where)
    return _scalar(value, f"{where}: {attr.name}")


def canonical_resource(
    doc: Any, schema: ResourceSchema, where: str = "the body", *, patch: bool = False
) -> CanonicalResource:
    """A resource the domain sends (POST, PUT, a PATCH value without a path) in canonical form.

    ``id`` and ``meta`` are read-only and dropped (RFC 7643 section 3.1), or with ``patch``
    refused (400 ``mutability``); an unknown attribute is 400 ``invalidValue``; two keys naming
    one attribute are 400 ``invalidSyntax``.
    """
    if not isinstance(doc, dict):
        raise _syntax(f"{where} must be a JSON object: a SCIM resource")
    builder = _Builder(where, patch)
    whole: set[str] = set()
    for key, value in doc.items():
        urn = schema.extension(key)
        if urn is None:
            resolved = schema.resolve(key)
            if resolved is None:
                raise InvalidValueError(
                    f"{where}: a {schema.name} has no attribute {key!r} (see /Schemas)"
                )
            builder.put(*resolved, key, value)
            continue
        if not isinstance(value, dict):
            raise _syntax(f"{where}: {key!r} holds the extension's attributes: an object")
        if urn in whole:
            raise _syntax(f"{where}: the extension {urn} is given twice")
        whole.add(urn)
        builder.extensions.setdefault(urn, {})
        for sub_key, sub_value in value.items():
            if sub_key.lower() == "schemas":
                continue  # some clients repeat it inside the extension: it says nothing there
            resolved = schema.resolve(f"{urn}:{sub_key}")
            if resolved is None:
                raise InvalidValueError(
                    f"{where}: {urn} has no attribute {sub_key!r} (see /Schemas)"
                )
            builder.put(*resolved, sub_key, sub_value)
    return builder.done()


@dataclass
class _Builder:
    """A canonical resource being built: each attribute placed once, by its canonical name."""

    where: str
    patch: bool
    out: CanonicalResource = field(default_factory=lambda: CanonicalResource({}))
    extensions: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: dict[AttrRef, str] = field(default_factory=dict)

    def put(self, ref: AttrRef, attr: Attribute, key: str, value: Any) -> None:
        where = self.where
        if ref in self.seen:
            raise _syntax(f"{where}: {key!r} and {self.seen[ref]!r} both name {ref}")
        self.seen[ref] = key
        common = ref.name.lower() if ref.extension is None else None
        if common in ("id", "meta"):
            if self.patch:  # RFC 7644 section 3.5.2: a PATCH may not target a read-only attribute
                raise InvalidValueError(f"{where}: {key} is read-only", scim_type="mutability")
        elif common == "externalid":
            if value is not None and not isinstance(value, str):
                raise InvalidValueError(f"{where}: externalId must be a string")
            self.out.external_id = (value,)
        elif common == "schemas":
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise _syntax(f"{where}: schemas is a list of schema URNs")
            self.out.attrs["schemas"] = value
        else:
            canonical = canonical_value(attr, value, where)
            if ref.extension is None:
                self.out.attrs[ref.name] = canonical
            else:
                self.extensions.setdefault(ref.extension, {})[ref.name] = canonical
            self.out.written.add(ref)

    def done(self) -> CanonicalResource:
        for urn, attrs in self.extensions.items():
            self.out.attrs[urn] = attrs
        return self.out


# ---------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class PathTarget:
    """What a PATCH path (or a filter's attribute path) names, canonically."""

    ref: AttrRef
    attr: Attribute | None
    """None when the path names a whole extension."""
    sub: str | None
    filter: FilterNode | None

    @property
    def text(self) -> str:
        """The path written canonically (RFC 7644 section 3.5.2 ``path``)."""
        if self.attr is None:
            return str(self.ref.extension)
        base = f"{self.ref.extension}:{self.ref.name}" if self.ref.extension else self.ref.name
        if self.filter is not None:
            base += f"[{self.filter}]"
        return f"{base}.{self.sub}" if self.sub else base


def resolve_path(attr_path: AttrPath, schema: ResourceSchema) -> tuple[AttrRef, Attribute | None]:
    """The attribute an AttrPath names (None for a whole extension); InvalidValueError if none."""
    key = f"{attr_path.uri}:{attr_path.attr}" if attr_path.uri else attr_path.attr
    urn = schema.extension(key) if attr_path.uri else None
    if urn is not None and attr_path.sub_attr is None:
        return AttrRef(urn, ""), None
    resolved = schema.resolve(key)
    if resolved is None:
        raise InvalidValueError(
            f"a {schema.name} has no attribute {key!r} (see /Schemas)", scim_type="invalidPath"
        )
    return resolved


def _patch_path(text: str, schema: ResourceSchema, n: int) -> PathTarget:
    try:
        ast = Path(text).ast
    except (InvalidPathException, ValueError) as exc:
        detail = getattr(exc, "detail", None) or str(exc)
        raise InvalidValueError(
            f"operation {n}: invalid path {text!r}: {detail}", scim_type="invalidPath"
        ) from exc
    if isinstance(ast, ValuePath):
        ref, attr = resolve_path(ast.attr_path, schema)
        return PathTarget(ref, attr, _sub_name(attr, ast.sub_attr, n), ast.val_filter)
    if isinstance(ast, AttrPath):
        ref, attr = resolve_path(ast, schema)
        return PathTarget(ref, attr, _sub_name(attr, ast.sub_attr, n), None)
    raise InvalidValueError(
        f"operation {n}: {text!r} is not an attribute path", scim_type="invalidPath"
    )


def _sub_name(attr: Attribute | None, sub: str | None, n: int) -> str | None:
    if sub is None or attr is None:
        return sub
    found = attr.sub(sub)
    if found is None and attr.sub_attributes:
        raise InvalidValueError(
            f"operation {n}: {attr.name} has no sub-attribute {sub!r}", scim_type="invalidPath"
        )
    return found.name if found is not None else sub


# ---------------------------------------------------------------------------- PATCH


@dataclass
class CanonicalPatch:
    """A PATCH request (RFC 7644 section 3.5.2) in canonical form."""

    body: dict[str, Any]
    """``{"schemas": [PatchOp], "Operations": [...]}`` with canonical keys, paths and values."""
    written: set[AttrRef] = field(default_factory=set)
    """Every attribute an operation changes (``schemas`` and ``externalId`` left out)."""
    filtered: set[AttrRef] = field(default_factory=set)
    """Attributes whose values an operation selects by a filter (they must be readable)."""
    targets: list[PathTarget | None] = field(default_factory=list)
    """Each operation's path, None where it has none."""


def canonical_keys(raw: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    """``raw`` with its keys matched to ``allowed`` case-insensitively; unknown or twice: 400."""
    by_lower = {k.lower(): k for k in allowed}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = by_lower.get(key.lower())
        if name is None:
            raise _syntax(f"{where}: unexpected key {key!r} (expected {', '.join(allowed)})")
        if name in out:
            raise _syntax(f"{where}: {name!r} is given twice")
        out[name] = value
    return out


def canonical_patch(body: Any, schema: ResourceSchema) -> CanonicalPatch:
    """A PATCH body in canonical form: keys, op names, paths and values (see module doc)."""
    if not isinstance(body, dict):
        raise _syntax("a PATCH body is a JSON object with schemas and Operations")
    top = canonical_keys(body, ("schemas", "Operations"), "the PATCH body")
    schemas = top.get("schemas")
    if not isinstance(schemas, list) or PATCH_OP not in schemas:
        raise InvalidValueError(f'a PATCH body must list "{PATCH_OP}" in schemas')
    raw_ops = top.get("Operations")
    if not isinstance(raw_ops, list) or not raw_ops:
        raise InvalidValueError("a PATCH body needs a non-empty Operations list")
    out = CanonicalPatch({"schemas": [PATCH_OP], "Operations": []})
    for n, raw in enumerate(raw_ops, start=1):
        if not isinstance(raw, dict):
            raise _syntax(f"operation {n} is not a JSON object")
        fields = canonical_keys(raw, ("op", "path", "value"), f"operation {n}")
        op = fields.get("op")
        if not isinstance(op, str) or op.lower() not in _OPS:
            raise InvalidValueError(f"operation {n}: {op!r} is not add, remove or replace")
        op = op.lower()
        canonical: dict[str, Any] = {"op": op}
        path_text = fields.get("path")
        target: PathTarget | None = None
        if path_text is not None:
            if not isinstance(path_text, str):
                raise InvalidValueError(
                    f"operation {n}: path must be a string", scim_type="invalidPath"
                )
            target = _patch_path(path_text, schema, n)
            _check_writable_path(target, n)
            canonical["path"] = target.text
            out.written.add(target.ref)
            if target.filter is not None:
                out.filtered.add(target.ref)
        elif op == "remove":
            raise InvalidValueError(f"operation {n}: remove needs a path", scim_type="noTarget")
        if "value" in fields:
            canonical["value"] = _patch_value(fields["value"], target, schema, n, out)
        elif op != "remove":
            raise InvalidValueError(f"operation {n}: {op} needs a value")
        out.body["Operations"].append(canonical)
        out.targets.append(target)
    return out


def _check_writable_path(target: PathTarget, n: int) -> None:
    name = target.ref.name.lower()
    if target.ref.extension is None and name in ("id", "meta"):
        raise InvalidValueError(
            f"operation {n}: {target.ref.name} is read-only", scim_type="mutability"
        )
    if target.ref.extension is None and name == "externalid" and (target.sub or target.filter):
        raise InvalidValueError(
            f"operation {n}: externalId has no sub-attributes", scim_type="invalidPath"
        )


def _patch_value(
    value: Any, target: PathTarget | None, schema: ResourceSchema, n: int, out: CanonicalPatch
) -> Any:
    where = f"operation {n}"
    if target is None:
        resource = canonical_resource(value, schema, f"{where}'s value", patch=True)
        out.written |= resource.written
        attrs = dict(resource.attrs)
        if resource.external_id is not None:
            attrs["externalId"] = resource.external_id[0]
        return attrs
    if target.attr is None:  # a whole extension
        wrapped = canonical_resource({target.ref.extension: value}, schema, f"{where}'s value")
        out.written |= wrapped.written
        return wrapped.attrs.get(str(target.ref.extension), {})
    if target.sub is not None:
        return _scalar(value, f"{where}: {target.ref.name}.{target.sub}")
    if target.filter is not None and isinstance(value, dict):
        return _complex_item(value, target.attr, where)
    if target.ref.extension is None and target.ref.name.lower() == "externalid":
        return value
    return canonical_value(target.attr, value, where, item=True)


# ---------------------------------------------------------------------------- filters


def filter_attributes(ast: FilterNode) -> Iterator[AttrPath]:
    """Every attribute path a filter compares (the outer path of a value path, whose inner
    names are its sub-attributes)."""
    stack: list[FilterNode] = [ast]
    while stack:
        node = stack.pop()
        if isinstance(node, Comparison | Present | ValuePath):
            yield node.attr_path
        elif isinstance(node, Not):
            stack.append(node.expr)
        else:
            stack.extend(getattr(node, "terms", ()))
