"""Rewriting the IDs inside SCIM documents, both ways, as pure functions over a lookup.

A response is translated in two passes so that the database is asked once per direction:
:func:`collect_ids` gathers every ID a document holds (with the resource type where it can be
told), the shell resolves them all in one query, and :func:`rewrite_document` rebuilds the
document with the answers. An ID the lookup does not answer is *missing*: outbound, the thing it
names does not exist for that domain (a member is left out, a single reference dropped, the
resource itself is invisible); inbound, the request is refused.

Places handled (DESIGN section 3): ``id``, ``meta.location``, the ``value`` and ``$ref`` of
every complex attribute whose ``$ref`` refers to resource types (``members``, ``groups``,
enterprise ``manager``, and any declared in the home's ``/Schemas``, extensions included), and
every plain ``reference`` attribute naming resource types. ``externalId`` is not rewritten here:
it belongs to each domain and is handled by the proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from broker.errors import InvalidValueError, NotFoundError
from broker.scim.schemas import RefAttr, ReferenceMap

__all__ = [
    "Endpoints",
    "InvisibleResource",
    "Translation",
    "UnknownReference",
    "collect_ids",
    "collect_item",
    "item_type",
    "rewrite_document",
    "rewrite_item",
]

Json = dict[str, Any]


class InvisibleResource(NotFoundError):
    """The resource itself does not exist for the calling domain."""


class UnknownReference(InvalidValueError):
    """A request names a resource the calling domain has no ID for (RFC 7644 section 3.12)."""


@dataclass(frozen=True)
class Endpoints:
    """Resource types and their endpoints (``User`` <-> ``/Users``), from ``/ResourceTypes``."""

    by_type: Mapping[str, str]
    _by_endpoint: Mapping[str, str] = field(init=False, repr=False, compare=False)
    _exact: Mapping[str, str] = field(init=False, repr=False, compare=False)
    """Each endpoint as spelled in :attr:`by_type` -> the type the lower-cased lookup gives it."""
    _prefixes: dict[str, str | None] = field(init=False, repr=False, compare=False)
    """A base -> ``{base without trailing /}/``, or None where the fast path does not apply."""

    def __post_init__(self) -> None:
        lowered = {e.strip("/").lower(): t for t, e in self.by_type.items()}
        object.__setattr__(self, "_by_endpoint", lowered)
        exact = {e.strip("/"): lowered[e.strip("/").lower()] for e in self.by_type.values()}
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_prefixes", {})

    @classmethod
    def default(cls) -> Endpoints:
        return cls({"User": "/Users", "Group": "/Groups"})

    @classmethod
    def from_resource_types(cls, resource_types: Sequence[Mapping[str, Any]]) -> Endpoints:
        found = {
            str(rt["name"]): "/" + str(rt["endpoint"]).strip("/")
            for rt in resource_types
            if "name" in rt and "endpoint" in rt
        }
        return cls(found or cls.default().by_type)

    def type_of(self, endpoint: str) -> str | None:
        return self._by_endpoint.get(endpoint.strip("/").lower())

    def parse_uri(self, uri: str, base: str) -> tuple[str, str] | None:
        """``{base}/{Endpoint}/{id}`` -> (resource type, id); None if the URI is not one of base's.

        An absolute URI must share base's scheme and host (compared without case); a relative
        one, its path.
        """
        # The fast path (issue 15): a URI that starts with base as written and names an endpoint
        # as home spells it is answered from two dict look-ups; anything else takes the general
        # path below, which gives the same answer for what the fast path accepts.
        prefix = self._prefixes.get(base, "")
        if prefix == "":
            prefix = self._prefix(base)
        if prefix is not None and uri.startswith(prefix):
            endpoint, _, resource_id = uri[len(prefix) :].partition("/")
            fast_type = self._exact.get(endpoint)
            if (
                fast_type is not None
                and resource_id
                and "/" not in resource_id
                and "?" not in resource_id
                and "#" not in resource_id
            ):
                return fast_type, resource_id
        base = base.rstrip("/")
        if "://" in uri:
            if uri[: len(base)].lower() != base.lower() or uri[len(base) : len(base) + 1] != "/":
                return None
            rest = uri[len(base) + 1 :]
        else:
            base_path = urlsplit(base).path
            if not uri.startswith(base_path + "/"):
                return None
            rest = uri[len(base_path) + 1 :]
        endpoint, _, resource_id = rest.partition("/")
        if not resource_id or "/" in resource_id or "?" in resource_id or "#" in resource_id:
            return None
        resource_type = self._by_endpoint.get(endpoint.lower())
        return (resource_type, resource_id) if resource_type is not None else None

    def _prefix(self, base: str) -> str | None:
        stripped = base.rstrip("/")
        prefix = stripped + "/" if "://" in stripped else None
        if len(self._prefixes) < 64:  # the bases of a deployment: a handful
            self._prefixes[base] = prefix
        return prefix

    def uri(self, base: str, resource_type: str, resource_id: str) -> str:
        return f"{base.rstrip('/')}{self.by_type[resource_type]}/{resource_id}"


@dataclass(frozen=True)
class Translation:
    """One direction of rewriting: the references to look for, and the base URIs they move
    between (home's and the broker's public one)."""

    refs: ReferenceMap
    endpoints: Endpoints
    source_base: str
    target_base: str

    def reversed(self) -> Translation:
        return Translation(self.refs, self.endpoints, self.target_base, self.source_base)


# A visitor receives (id, resource type or None) and returns the new ID, or None when missing.
IdVisitor = Callable[[str, str | None], str | None]


@dataclass(frozen=True)
class _Context:
    refs: ReferenceMap
    endpoints: Endpoints
    source_base: str
    target_base: str
    visit: IdVisitor


def _key(item: Mapping[str, Any], name: str) -> str | None:
    """The key of sub-attribute ``name`` (lower-case) in ``item``, whatever its case."""
    if name in item:
        return name
    return next((k for k in item if k.lower() == name), None)


def item_type(
    item: Mapping[str, Any], attr: RefAttr, endpoints: Endpoints, base: str
) -> str | None:
    declared = item.get("type")
    if isinstance(declared, str):
        match = next((t for t in attr.resource_types if t.lower() == declared.lower()), None)
        if match:
            return match
    ref = item.get("$ref")
    if isinstance(ref, str):
        parsed = endpoints.parse_uri(ref, base)
        if parsed:
            return parsed[0]
    return next(iter(attr.resource_types)) if len(attr.resource_types) == 1 else None


def _rewrite_uri(uri: Any, ctx: _Context) -> str | None:
    if not isinstance(uri, str):
        return None
    parsed = ctx.endpoints.parse_uri(uri, ctx.source_base)
    if parsed is None:
        return None
    resource_type, old = parsed
    new = ctx.visit(old, resource_type)
    return None if new is None else ctx.endpoints.uri(ctx.target_base, resource_type, new)


def _rewrite_item(item: Any, attr: RefAttr, ctx: _Context) -> Any | None:
    """One value of a reference attribute, rewritten; None when what it names is missing."""
    if not attr.complex:
        return _rewrite_uri(item, ctx)
    if not isinstance(item, dict):
        return None
    out = dict(item)
    resource_type = item_type(item, attr, ctx.endpoints, ctx.source_base)
    value_key = _key(item, "value")
    ref_key = _key(item, "$ref")
    if value_key is not None:
        if not isinstance(item[value_key], str):
            return None
        new = ctx.visit(item[value_key], resource_type)
        if new is None:
            return None
        out[value_key] = new
        if ref_key is not None and resource_type is not None:
            out[ref_key] = ctx.endpoints.uri(ctx.target_base, resource_type, new)
        elif ref_key is not None:
            del out[ref_key]  # a reference the broker cannot rebuild is not passed on
    elif ref_key is not None:
        new_ref = _rewrite_uri(item[ref_key], ctx)
        if new_ref is None:
            return None
        out[ref_key] = new_ref
    return out


def rewrite_item(
    item: Any, attr: RefAttr, translation: Translation, visit: IdVisitor
) -> Any | None:
    """One value of a reference attribute rewritten as :func:`rewrite_document` rewrites it;
    None when what it names is missing."""
    t = translation
    return _rewrite_item(
        item, attr, _Context(t.refs, t.endpoints, t.source_base, t.target_base, visit)
    )


def _rewrite_attributes(
    attrs: Json, ctx: _Context, extension: str | None, on_missing: Callable[[str, Any], None]
) -> Json:
    out: Json = {}
    for key, value in attrs.items():
        is_extension, attr = ctx.refs.classify(key, extension)
        if is_extension and isinstance(value, dict):
            out[key] = _rewrite_attributes(value, ctx, key, on_missing)
            continue
        if attr is None or value is None:
            out[key] = value
        elif isinstance(value, list):
            kept = []
            for item in value:
                new = _rewrite_item(item, attr, ctx)
                if new is None:
                    on_missing(key, item)
                else:
                    kept.append(new)
            out[key] = kept
        else:
            new = _rewrite_item(value, attr, ctx)
            if new is None:
                on_missing(key, value)
            else:
                out[key] = new
    return out


def rewrite_document(
    doc: Json,
    translation: Translation,
    translate: IdVisitor,
    *,
    resource_type: str | None = None,
    strict: bool = False,
) -> Json:
    """``doc`` with every ID translated and every URI moved from ``source_base`` to ``target_base``.

    Outbound (``strict=False``) a missing reference is left out; a missing ``id`` raises
    :class:`InvisibleResource`. Inbound (``strict=True``) any missing reference raises
    :class:`UnknownReference`, naming the attribute and value the caller sent.
    """
    t = translation
    ctx = _Context(t.refs, t.endpoints, t.source_base, t.target_base, translate)

    def on_missing(key: str, value: Any) -> None:
        if strict:
            shown = value.get("value", value.get("$ref")) if isinstance(value, dict) else value
            raise UnknownReference(f"{key}: {shown!r} does not name a resource you can refer to")

    out = _rewrite_attributes(doc, ctx, None, on_missing)
    resource_type = resource_type or _meta_type(doc)
    if "id" in doc:
        new_id = translate(doc["id"], resource_type) if isinstance(doc["id"], str) else None
        if new_id is None:
            if strict:
                raise UnknownReference(
                    f"id: {doc['id']!r} does not name a resource you can refer to"
                )
            raise InvisibleResource("resource not found")
        out["id"] = new_id
    meta = doc.get("meta")
    if isinstance(meta, dict) and "location" in meta:
        new_meta = dict(meta)
        location = _rewrite_uri(meta["location"], ctx)
        if location is None:
            del new_meta["location"]
        else:
            new_meta["location"] = location
        out["meta"] = new_meta
    return out


def _meta_type(doc: Json) -> str | None:
    meta = doc.get("meta")
    value = meta.get("resourceType") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def collect_item(
    item: Any, attr: RefAttr, translation: Translation, add: Callable[[str, str | None], None]
) -> None:
    """The ID one value of a reference attribute holds, if any, given to ``add`` (with its
    resource type where it can be told): what :func:`collect_ids` reads of each value."""
    endpoints, source_base = translation.endpoints, translation.source_base
    if not attr.complex:
        uri = item
    elif isinstance(item, dict):
        value_key = _key(item, "value")
        if value_key is not None:
            if isinstance(item[value_key], str):
                add(item[value_key], item_type(item, attr, endpoints, source_base))
            return
        ref_key = _key(item, "$ref")
        uri = item[ref_key] if ref_key is not None else None
    else:
        return
    parsed = endpoints.parse_uri(uri, source_base) if isinstance(uri, str) else None
    if parsed is not None:
        add(parsed[1], parsed[0])


def collect_ids(
    doc: Json, translation: Translation, *, resource_type: str | None = None
) -> dict[str, str | None]:
    """Every ID ``doc`` holds -> its resource type where it can be told (None otherwise).

    It reads exactly the places :func:`rewrite_document` rewrites, without copying anything.
    """
    refs, endpoints, source_base = translation.refs, translation.endpoints, translation.source_base
    found: dict[str, str | None] = {}

    def add(resource_id: str, rtype: str | None) -> None:
        if found.get(resource_id) is None:
            found[resource_id] = rtype

    def add_uri(uri: Any) -> None:
        parsed = endpoints.parse_uri(uri, source_base) if isinstance(uri, str) else None
        if parsed is not None:
            add(parsed[1], parsed[0])

    def walk(attrs: Mapping[str, Any], extension: str | None) -> None:
        for key, value in attrs.items():
            is_extension, attr = refs.classify(key, extension)
            if is_extension and isinstance(value, dict):
                walk(value, key)
                continue
            if attr is None or value is None:
                continue
            for item in value if isinstance(value, list) else (value,):
                collect_item(item, attr, translation, add)

    walk(doc, None)
    if isinstance(doc.get("id"), str):
        add(doc["id"], resource_type or _meta_type(doc))
    meta = doc.get("meta")
    if isinstance(meta, dict):
        add_uri(meta.get("location"))
    return found
